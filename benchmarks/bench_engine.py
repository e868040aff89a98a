"""The one population engine against a plain PyTorch minibatch loop, one thread, one process.

    python benchmarks/bench_engine.py [--passes N] [--repeats K] [--seeds R] [--out FILE.json]

The baseline is the modern recipe written the way a PyTorch user writes it: Net1989's nn
ops with ReLU and logits, dropout 0.25 before H3, cross-entropy, torch.optim.AdamW (weight
decay 0.01), batch 32, random shifts of up to one pixel, `loss.backward(); opt.step()`.
The engine trains the `modern` preset (the same recipe, lr 3e-3 -> 1e-4) on its automatic
path: one replica, and a population of R seeds (reported per replica). Every figure is
seconds per pass over the 7,291 canonical training digits, the median of the repeats, after
an untimed warm-up pass; ratios are against the baseline timed in the same run. The machine
may be shared: the JSON records the load average, and only ratios within one run count.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from backproplab.config import apply_overrides, preset  # noqa: E402
from backproplab.data import load_dataset, pass_randomness  # noqa: E402
from backproplab.data.augment import shift_images  # noqa: E402
from backproplab.engine.population import Population  # noqa: E402
from backproplab.models.net1989 import Net1989  # noqa: E402


def baseline_pass_seconds(data, passes: int) -> list:
    """Plain PyTorch: nn ops, torch.optim.AdamW, batch 32, shifts drawn per batch."""
    model = Net1989(0, act="relu", out_act="none", dropout=0.25).train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-3, weight_decay=0.01)
    x, y = data.train_x.reshape(-1, 1, 16, 16), data.train_labels.long()
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(passes + 1):  # the first pass is the warm-up
        t0 = time.perf_counter()
        for a in range(0, len(x), 32):
            xb = x[a:a + 32]
            xb = shift_images(xb, torch.randint(-1, 2, (len(xb), 2), generator=g))
            loss = F.cross_entropy(model(xb), y[a:a + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return times[1:]


def engine_pass_seconds(data, seeds: int, passes: int, overrides=(), path="auto") -> tuple:
    cfg = apply_overrides(preset("modern"), [f"train.passes={passes + 1}", *overrides])
    eng = Population(cfg, list(range(seeds)), path=path)
    x, y = data.train_x.reshape(-1, 16, 16).numpy(), data.train_labels.numpy()
    n, times = len(x), []
    for p in range(passes + 1):
        rand = [pass_randomness(s, p, n, cfg.train.shift, cfg.model.dropout, eng.dropout_units) for s in range(seeds)]
        t0 = time.perf_counter()
        eng.train_pass(x, y, None, np.stack([r[0] for r in rand]), np.stack([r[1] for r in rand]))
        eng.end_pass()
        times.append(time.perf_counter() - t0)
    return times[1:], eng.path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passes", type=int, default=3, help="timed passes per repeat (default 3)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats; the median is quoted (default 3)")
    ap.add_argument("--seeds", type=int, default=8, help="replicas of the population (default 8)")
    ap.add_argument("--out", help="write the JSON here too")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("mnist10k")
    runs = {"baseline": [], "engine_1": [], f"engine_{a.seeds}": [], "engine_1_autograd": []}
    paths = {}
    for _ in range(a.repeats):  # interleaved, so a change in the machine's load hits every variant
        runs["baseline"] += baseline_pass_seconds(data, a.passes)
        t, paths["engine_1"] = engine_pass_seconds(data, 1, a.passes)
        runs["engine_1"] += t
        t, paths[f"engine_{a.seeds}"] = engine_pass_seconds(data, a.seeds, a.passes)
        runs[f"engine_{a.seeds}"] += [v / a.seeds for v in t]   # per replica
        t, paths["engine_1_autograd"] = engine_pass_seconds(data, 1, a.passes, path="autograd")
        runs["engine_1_autograd"] += t
    med = {k: statistics.median(v) for k, v in runs.items()}
    out = {"seconds_per_pass": med, "speedup_vs_baseline": {k: med["baseline"] / v for k, v in med.items()},
           "paths": paths, "seeds": a.seeds, "passes": a.passes, "repeats": a.repeats,
           "load_average": os.getloadavg(), "torch": torch.__version__, "machine": platform.machine(),
           "note": "engine_R is seconds per replica-pass; engine_1_autograd forces the autograd path"}
    for k in runs:
        print(f"{k:>20}: {med[k]:.3f} s a pass  {med['baseline'] / med[k]:6.1f}x  ({paths.get(k, 'plain torch')})")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
