"""The autograd path for ModNet: the stacked forward against the loop over R modules, one thread.

    python benchmarks/bench_autograd.py [--seeds R] [--steps N] [--repeats K] [--out FILE.json]

The modern recipe (`preset("modern")`: ReLU, logits, dropout 0.25, shifts, AdamW, batch 32)
plus one model method (+method=batchnorm, resblocks, dropout (with model.dropout=0, which
it replaces), nonorm), trained by a
population of R seeds on the autograd path, once with the stacked forward (the engine's
default for ModNet) and once with the loop over the R modules (Population(..., _loop=True),
the engine before the stacked forward). Each figure is seconds per replica-pass (7,291
digits, one pass = 228 steps of 32): steps are timed in blocks of N consecutive steps of a
pass and scaled to a pass, the median over the repeats; loop and stacked blocks alternate,
so a change in the machine's load hits both, and only the ratios within one run count (the
JSON records the load average).
"""
import argparse
import json
import math
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

from backproplab.config import apply_overrides, preset  # noqa: E402
from backproplab.data import load_dataset, pass_randomness  # noqa: E402
from backproplab.engine.population import Population  # noqa: E402

METHODS = ("plain", "batchnorm", "resblocks", "dropout", "nonorm")


def engine(method, seeds, loop):
    over = [] if method == "plain" else [f"+method={method}"]
    if method == "dropout":  # the method drops H2's outputs itself: the recipe's own dropout off
        over.append("model.dropout=0")
    cfg = apply_overrides(preset("modern"), over)
    return Population(cfg, list(range(seeds)), path="autograd", _loop=loop)


def block_seconds(eng, data, steps) -> float:
    """Seconds for `steps` consecutive steps of pass 0 (the engine's own per-step work: lr, batch,
    forward, loss, backward, methods, optimizer), after one untimed step."""
    x, y = data.train_x.reshape(-1, 16, 16), data.train_labels.long()
    n, R, cfg = (steps + 1) * 32, eng.R, eng.cfg
    rand = [pass_randomness(s, 0, n, cfg.train.shift, cfg.model.dropout, eng.dropout_units) for s in range(R)]
    keep = np.stack([r[1] for r in rand]) if cfg.model.dropout else None
    eng.train_pass(x[:n].numpy(), y[:n].numpy(), None, np.stack([r[0] for r in rand]), keep)
    inner, times = eng._step, []

    def timed(*a):
        t0 = time.perf_counter()
        inner(*a)
        times.append(time.perf_counter() - t0)
    eng._step = timed
    eng.end_pass()
    eng._step = inner
    return sum(times[1:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=8, help="replicas of the population (default 8)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per block (default 20)")
    ap.add_argument("--repeats", type=int, default=5, help="blocks per variant; the median is quoted (default 5)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    ap.add_argument("--out", help="write the JSON here too")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("mnist10k")
    per_pass = math.ceil(len(data.train_x) / 32) / a.steps / a.seeds   # block seconds -> seconds per replica-pass
    result = {}
    for method in a.methods.split(","):
        engines = {"loop": engine(method, a.seeds, True), "stacked": engine(method, a.seeds, False)}
        runs = {k: [] for k in engines}
        for _ in range(a.repeats):
            for k, eng in engines.items():
                runs[k].append(block_seconds(eng, data, a.steps) * per_pass)
        med = {k: statistics.median(v) for k, v in runs.items()}
        result[method] = {"seconds_per_replica_pass": med, "speedup": med["loop"] / med["stacked"],
                          "runs": runs}
        print(f"{method:>10}: loop {med['loop']:.3f} s  stacked {med['stacked']:.3f} s a replica-pass  "
              f"{med['loop'] / med['stacked']:.2f}x", flush=True)
    out = {"recipe": "modern", "seeds": a.seeds, "batch": 32, "steps_per_block": a.steps, "repeats": a.repeats,
           "results": result, "load_average": os.getloadavg(), "torch": torch.__version__,
           "machine": platform.machine(), "threads": torch.get_num_threads(),
           "note": "seconds per replica-pass of the autograd path; loop = Population(..., _loop=True)"}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({m: r["speedup"] for m, r in result.items()}))


if __name__ == "__main__":
    main()
