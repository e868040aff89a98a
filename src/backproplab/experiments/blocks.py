"""Efficient blocks: test error against multiply-adds and parameters across block types and a
compound width / depth / resolution knob (EfficientNet's idea, Tan & Le 2019: grow the three
together), n seeds a cell, and the Pareto plots.

  python -m backproplab.experiments.blocks --seeds 2 --passes 5 --out DIR [--json] [--smoke]

Cells: every block type (plain, separable, inverted_residual) at each compound level
  level 0: size 2 (no extra layer), width 2 (w 8),  16x16 input
  level 1: size 3 (one extra),      width 3 (w 12), 20x20 input
  level 2: size 5 (two extra),      width 4 (w 16), 28x28 input
Each cell is one run of the population engine (engine/train.train, the call `backproplab
train` makes): its seeds are the replicas of one population, its inputs the embedded set's
28x28 sources through the 1989 preprocessing at the cell's side (data.resolution), canonical
split, the last 1,000 training digits held out as the validation split (reported beside
test; nothing here is chosen on either; the test split is evaluated after the last pass only).
The recipe is the modern preset's (AdamW, weight decay 0.01, cross-entropy, batches of 32 in
the engine's fixed order, lr linearly to 1e-4 per step) with the study's own settings: peak
lr 3e-3, no dropout, no shifts, `passes` passes. Every run is checkpointed and stored in the
results store of --out (kind "blocks"); a cell already finished there is read back, a stopped
one resumes.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ..config import apply_overrides, preset
from ..errors import UserError
from ..jsonout import emit_json
from ..models import convnet as cn

LEVELS = [{"size": 2, "width": 2, "resolution": 16}, {"size": 3, "width": 3, "resolution": 20},
          {"size": 5, "width": 4, "resolution": 28}]
VAL = 1000
KIND = "blocks"
# the modern preset with the study's settings (what the cells trained with before they ran on the engine)
RECIPE = ["model.name=convnet", "model.dropout=0", "train.shift=0", "optim.lr=3e-3", "optim.lr_end=1e-4"]


def cell_config(block: str, li: int, seeds: int, passes: int, smoke: bool = False):
    """The engine config of one cell (named blocks-L<li>-<block>): the modern preset, RECIPE, the
    cell's block and compound level LEVELS[li]."""
    level = LEVELS[li]
    sizes = ["data.n_train=260", "data.n_test=100", "data.val=60"] if smoke else [f"data.val={VAL}"]
    cfg = apply_overrides(preset("modern"), RECIPE + sizes + [
        f"model.block={block}", f"model.depth={level['size']}", f"model.width={level['width']}",
        f"data.resolution={level['resolution']}", f"train.passes={passes}", f"train.seeds={seeds}",
        f"train.eval_every={passes}", "train.eval_train=false", "train.eval_test=false"])
    cfg.name = f"{KIND}-L{li}-{block}"
    return cfg


def train_cell(cfg, out: Path, label: str = "pass"):
    """Train (or read back, or resume) one cell in `out` and record it in out's store once ->
    (Result, run id)."""
    from ..engine.checkpoint import has_checkpoint
    from ..engine.train import checkpoint_path, environment, train
    from ..report.progress import ProgressBar
    from ..store import add_run, recorded_run
    bar = ProgressBar(cfg.train.passes, label=label)
    try:
        res = train(cfg, out=out, resume=has_checkpoint(checkpoint_path(cfg, out)), progress=bar)
    finally:
        bar.clear()
    s = res.summary()
    run_id = recorded_run(out, KIND, s["config_digest"], res.status)
    if run_id is None:
        run_id = add_run(out, KIND, cfg.name, res.status, res.config, s, res.history, environment())
    return res, run_id


def run(seeds: int, passes: int, out, smoke: bool = False, blocks=cn.BLOCKS, log=print) -> list[dict]:
    from ..engine.train import prepare_out
    from ..store import check_store
    out = prepare_out(out)
    check_store(out)  # a foreign or damaged runs.db is refused before training, not after
    rows = []
    for li, level in enumerate(LEVELS):
        for block in blocks:
            cfg = cell_config(block, li, seeds, passes, smoke)
            res, run_id = train_cell(cfg, out, label=f"L{li} {block}: pass")
            val = np.array([f["val_error"] for f in res.final])
            test = np.array([f["test_error"] for f in res.final])
            r = level["resolution"]
            row = {"block": block, "level": li, **level, "seeds": seeds, "passes": passes,
                   "params": cn.conv_params(level["size"], block, level["width"], r),
                   "macs": cn.conv_macs(level["size"], block, level["width"], r),
                   "val_error": float(val.mean()), "val_error_std": float(val.std(ddof=1)) if seeds > 1 else 0.0,
                   "test_error": float(test.mean()), "test_error_std": float(test.std(ddof=1)) if seeds > 1 else 0.0,
                   "per_seed_test": test.tolist(), "seconds": round(res.seconds, 1), "status": res.status,
                   "path": res.path, "config_digest": cfg.digest(), "run_id": run_id}
            rows.append(row)
            log(f"level {li} {block}: {row['params']} params, {row['macs']} MACs, test {row['test_error']:.2f}% "
                f"({res.seconds:.0f} s, run {run_id}{'' if res.status == 'finished' else ', ' + res.message})")
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
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror}") from None
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
    try:
        if a.seeds < 2 or a.passes < 1:
            raise UserError("--seeds must be >= 2 (a spread) and --passes >= 1")
        t0 = time.perf_counter()
        rows = run(a.seeds, 1 if a.smoke else a.passes, a.out, a.smoke, log=(lambda s: None) if a.json else print)
        plots = plot(rows, Path(a.out) / "blocks")
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
