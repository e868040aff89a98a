"""Efficient blocks: test error against multiply-adds and parameters across block types and a
compound width / depth / resolution knob (EfficientNet's idea, Tan & Le 2019: grow the three
together), n seeds a cell, and the Pareto plots.

  python -m backproplab.experiments.blocks --seeds 2 --passes 5 --out DIR [--json] [--smoke]

Cells: every block type (plain, separable, inverted_residual) at each compound level
  level 0: size 2 (no extra layer), width 2 (w 8),  16x16 input
  level 1: size 3 (one extra),      width 3 (w 12), 20x20 input
  level 2: size 5 (two extra),      width 4 (w 16), 28x28 input
Inputs at side r come from the embedded set's 28x28 sources through the 1989
preprocessing at that size (data/preprocess.preprocess_1989(size=r): bilinear resize of
uint8/127.5 - 1; r = 28 is the source itself), canonical split, the last 1,000 training
digits held out as the validation split (reported beside test; nothing here is chosen on
either).

The engine's data path is 16x16 (engine/population.py reshapes to 16x16), so the cells train
here, every one with the same loop: AdamW (weight decay 0.01), cross-entropy, batches of 32
in a seeded order, lr 3e-3 -> 1e-4 linearly per step, `passes` passes, one thread; seeds one
after another. `backproplab train modern model.name=convnet model.block=...` trains the
16x16 members on the engine.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.preprocess import preprocess_1989
from ..data.sources import canonical_split, load_mnist10k
from ..errors import UserError
from ..jsonout import emit_json
from ..models import convnet as cn

LEVELS = [{"size": 2, "width": 2, "resolution": 16}, {"size": 3, "width": 3, "resolution": 20},
          {"size": 5, "width": 4, "resolution": 28}]
VAL = 1000


def digits_at(side: int, smoke: bool = False):
    """-> dict of (x, labels) for train / val / test at side x side pixels."""
    images, labels = load_mnist10k()
    tr, te = canonical_split()
    x, _, lab = preprocess_1989(images[tr], labels[tr], size=side)
    tx, _, tlab = preprocess_1989(images[te], labels[te], size=side)
    if smoke:
        return {"train": (x[:200], lab[:200]), "val": (x[200:260], lab[200:260]), "test": (tx[:100], tlab[:100])}
    k = len(x) - VAL
    return {"train": (x[:k], lab[:k]), "val": (x[k:], lab[k:]), "test": (tx, tlab)}


def train_cell(block, level, seed, passes, data, lr=3e-3, lr_end=1e-4, batch=32):
    net = cn.ConvNet(seed, size=level["size"], block=block, width=level["width"], resolution=level["resolution"])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    x, lab = data["train"]
    steps = passes * math.ceil(len(x) / batch)
    g = torch.Generator().manual_seed(1000 + seed)
    t, t0 = 0, time.perf_counter()
    for _ in range(passes):
        order = torch.randperm(len(x), generator=g)
        for a in range(0, len(x), batch):
            for group in opt.param_groups:
                group["lr"] = lr + (lr_end - lr) * t / max(steps - 1, 1)
            i = order[a:a + batch]
            loss = F.cross_entropy(net(x[i]), lab[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            t += 1
    seconds = time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
        err = {sp: 100.0 * float((net(data[sp][0]).argmax(1) != data[sp][1]).float().mean()) for sp in ("val", "test")}
    return err, seconds


def run(seeds: int, passes: int, smoke: bool = False, blocks=cn.BLOCKS, log=print) -> list[dict]:
    rows = []
    for li, level in enumerate(LEVELS):
        data = digits_at(level["resolution"], smoke)
        for block in blocks:
            errs, secs = [], 0.0
            for s in range(seeds):
                e, dt = train_cell(block, level, s, passes, data)
                errs.append(e)
                secs += dt
            val, test = np.array([e["val"] for e in errs]), np.array([e["test"] for e in errs])
            row = {"block": block, "level": li, **level, "seeds": seeds, "passes": passes,
                   "params": cn.conv_params(level["size"], block, level["width"], level["resolution"]),
                   "macs": cn.conv_macs(level["size"], block, level["width"], level["resolution"]),
                   "val_error": float(val.mean()), "val_error_std": float(val.std(ddof=1)) if seeds > 1 else 0.0,
                   "test_error": float(test.mean()), "test_error_std": float(test.std(ddof=1)) if seeds > 1 else 0.0,
                   "per_seed_test": test.tolist(), "seconds": round(secs, 1)}
            rows.append(row)
            log(f"level {li} {block}: {row['params']} params, {row['macs']} MACs, test {row['test_error']:.2f}% "
                f"({secs:.0f} s)")
    return rows


def pareto(points):
    """Indices of the points (cost, error) no other point beats on both (lower is better)."""
    keep = []
    for i, (c, e) in enumerate(points):
        if not any((c2 <= c and e2 <= e) and (c2 < c or e2 < e) for j, (c2, e2) in enumerate(points) if j != i):
            keep.append(i)
    return keep


def plot(rows, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for key, label in (("macs", "multiply-adds per image"), ("params", "parameters")):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for block, mk in zip(cn.BLOCKS, "osD"):
            rr = [r for r in rows if r["block"] == block]
            ax.errorbar([r[key] for r in rr], [r["test_error"] for r in rr], yerr=[r["test_error_std"] for r in rr],
                        marker=mk, capsize=3, label=block)
            for r in rr:
                ax.annotate(f"L{r['level']}", (r[key], r["test_error"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        front = pareto([(r[key], r["test_error"]) for r in rows])
        fr = sorted((rows[i] for i in front), key=lambda r: r[key])
        ax.plot([r[key] for r in fr], [r["test_error"] for r in fr], "k:", lw=1, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test error (%)")
        ax.set_title(f"convnet blocks, compound levels ({rows[0]['seeds']} seeds)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / f"blocks_error_vs_{key}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


def table(rows) -> str:
    from ..report.console import render, table as rich_table
    cols = ["block"] + [(c, "right") for c in ("level", "size", "width", "res", "params", "MACs", "val error",
                                               "test error", "train s")]
    return render(rich_table(cols, [[r["block"], str(r["level"]), str(r["size"]), str(r["width"]), str(r["resolution"]),
                                     str(r["params"]), str(r["macs"]),
                                     f"{r['val_error']:.2f} +- {r['val_error_std']:.2f}%",
                                     f"{r['test_error']:.2f} +- {r['test_error_std']:.2f}%", f"{r['seconds']:.0f}"]
                                    for r in rows]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backproplab.experiments.blocks")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--out", default="runs")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        if a.seeds < 2 or a.passes < 1:
            raise UserError("--seeds must be >= 2 (a spread) and --passes >= 1")
        out = Path(a.out) / "blocks"
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {out}: {e.strerror}") from None
        t0 = time.perf_counter()
        rows = run(a.seeds, 1 if a.smoke else a.passes, a.smoke, log=(lambda s: None) if a.json else print)
        plots = plot(rows, out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    print(f"{time.perf_counter() - t0:.0f} s; plots: {', '.join(plots)}")
    if a.json:
        emit_json({"rows": rows, "plots": plots, "seconds": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
