"""What +method=qat costs a training pass on the population engine, against the same pass without it.

    python benchmarks/bench_qat.py [--seeds R] [--repeats K] [--out FILE.json]

The modern recipe (Net1989, AdamW, batch 32, shifts and dropout from train()'s streams), one thread,
R replicas in one population, on the path the engine chooses (the numba kernels on an AVX-512 CPU;
qat keeps it). Each repeat trains one pass of the 7,291 training digits with and without qat,
interleaved, from a fresh population; the figure is the median over the repeats and the ratio is
qat / plain within this run. The machine may be shared: the JSON records the load average.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from backproplab.config import apply_overrides, preset  # noqa: E402
from backproplab.data import load_dataset  # noqa: E402
from backproplab.engine.population import Population, train_passes  # noqa: E402


def one_pass(cfg, seeds, x, y) -> tuple[float, str]:
    eng = Population(cfg, seeds)
    t0 = time.perf_counter()
    train_passes(eng, x, y, 1)
    return time.perf_counter() - t0, eng.path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="write the JSON here too")
    a = ap.parse_args()
    torch.set_num_threads(1)
    base = preset("modern")
    data = load_dataset(base.data.source, base.data.n_train, base.data.n_test)
    x, y = data.train_x.reshape(-1, 16, 16).numpy(), data.train_labels.numpy()
    cfgs = {"plain": base, "qat": apply_overrides(preset("modern"), ["+method=qat"])}
    seeds = list(range(a.seeds))
    for c in cfgs.values():  # warm-up: numba's cache, first-call costs
        one_pass(c, seeds, x[:512], y[:512])
    times, paths = {k: [] for k in cfgs}, {}
    for _ in range(a.repeats):
        for k, c in cfgs.items():
            dt, paths[k] = one_pass(c, seeds, x, y)
            times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"seeds": a.seeds, "repeats": a.repeats, "digits": len(x), "batch": base.train.batch, "paths": paths,
           "pass_seconds_median": med, "pass_seconds": times, "qat_over_plain": med["qat"] / med["plain"],
           "loadavg": os.getloadavg(), "torch": torch.__version__, "threads": 1}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
