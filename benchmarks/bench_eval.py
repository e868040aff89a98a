"""The evaluation kernel against the torch evaluation it replaces, one thread, one process.

    python benchmarks/bench_eval.py [--seeds R] [--repeats K] [--out FILE.json]

What train() evaluates after every pass: Population.evaluate on the 7,291 training and the
2,007 test digits (9,298 images) for a population of R seeds, in two recipes, `modern`
(ReLU, logits, cross-entropy) and `lecun1989` (tanh everywhere, MSE):
  torch_*   the baseline: what the kernel path's evaluation ran before engine/_kernels_eval.py,
            written out here (the population's own modules, one replica at a time, EVAL_CHUNK
            images a call, eval mode, no autograd) so a change to the engine cannot move it;
  kernel_*  Population.evaluate on the kernel path: the evaluation kernel;
  autograd_* / fused_modern  Population.evaluate on the autograd path (its torch forward as the
            engine has it now) and on the fused path (models/fused1989.logits), for reference;
  per_example_torch / per_example_kernel  engine/evaluate.py (the per-example engines'
            evaluation) with kernel=False and with the kernel, lecun1989's activations.
Each figure is the median of the repeats (seconds for the 9,298 images and R replicas), after
an untimed warm-up call of each variant; the variants are interleaved within each repeat and
every ratio is against the torch evaluation timed in the same run. The machine may be shared:
the JSON records the load average and, next to wall seconds, the process's CPU seconds (which
a busy machine inflates less); only ratios within one run count.
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

import numba  # noqa: E402
import torch  # noqa: E402

from backproplab.config import apply_overrides, preset  # noqa: E402
from backproplab.data import load_dataset  # noqa: E402
from backproplab.engine import evaluate as EV  # noqa: E402
from backproplab.engine.population import EVAL_CHUNK, Population  # noqa: E402

SPLITS = ("train", "test")


def population_eval(eng, data, loss):
    """Both splits, as train()'s _evaluate_pass asks for them."""
    return [eng.evaluate(getattr(data, f"{sp}_x"), getattr(data, f"{sp}_labels"), loss) for sp in SPLITS]


@torch.no_grad()
def module_eval(eng, data, loss):
    """The torch evaluation the kernel path had: each replica's module on EVAL_CHUNK images at a time."""
    out = []
    for sp in SPLITS:
        x = torch.as_tensor(getattr(data, f"{sp}_x"), dtype=torch.float32).reshape(-1, 1, 16, 16)
        for m in eng.models:
            m.eval()
        o = torch.stack([torch.cat([m(x[a:a + EVAL_CHUNK]).float() for a in range(0, len(x), EVAL_CHUNK)])
                         for m in eng.models])
        for m in eng.models:
            m.train()
        out.append(EV.metrics_from_outputs(o, getattr(data, f"{sp}_labels").long(), loss))
    return out


def per_example_eval(params, data, kernel):
    cfg = preset("lecun1989")
    return [EV.metrics_from_outputs(EV.population_outputs(params, x.reshape(-1, 1, 16, 16), cfg.model.act,
                                                          cfg.model.out_act, kernel=kernel), y.long(), "mse")
            for x, y in ((data.train_x, data.train_labels), (data.test_x, data.test_labels))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=8, help="replicas of the population (default 8)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats; the median is quoted (default 5)")
    ap.add_argument("--out", help="write the JSON here too")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("mnist10k")
    seeds = list(range(a.seeds))
    variants = {}
    for recipe in ("modern", "lecun1989"):
        cfg = apply_overrides(preset(recipe), [])
        loss = cfg.train.loss
        eng = {p: Population(cfg, seeds, path=p) for p in ("autograd", "kernel")}
        base = f"torch_{recipe}"   # variant: (call, what runs, the torch evaluation it is compared with)
        variants[base] = (lambda e=eng["kernel"], l=loss: module_eval(e, data, l), "torch modules", base)
        variants[f"kernel_{recipe}"] = (lambda e=eng["kernel"], l=loss: population_eval(e, data, l), "kernel", base)
        variants[f"autograd_{recipe}"] = (lambda e=eng["autograd"], l=loss: population_eval(e, data, l),
                                          "autograd", base)
        if recipe == "modern":
            f = Population(cfg, seeds, path="fused")
            variants["fused_modern"] = (lambda e=f, l=loss: population_eval(e, data, l), "fused", base)
    params = Population(apply_overrides(preset("lecun1989"), []), seeds, path="autograd").params()
    variants["per_example_torch"] = (lambda: per_example_eval(params, data, False), "engine/evaluate.py, torch",
                                     "per_example_torch")
    variants["per_example_kernel"] = (lambda: per_example_eval(params, data, None), "engine/evaluate.py, kernel",
                                      "per_example_torch")
    results = {}
    for k, (fn, _, _) in variants.items():   # warm-up: loads the kernels, fills torch's caches
        results[k] = fn()
    for recipe in ("modern", "lecun1989"):   # the kernel evaluates what torch evaluates
        for t, g in zip(results[f"torch_{recipe}"], results[f"kernel_{recipe}"]):
            assert [r["misses"] for r in t] == [r["misses"] for r in g], recipe
            assert max(abs(a["loss"] - b["loss"]) for a, b in zip(t, g)) < 1e-4, recipe
    runs, cpu = {k: [] for k in variants}, {k: [] for k in variants}
    for _ in range(a.repeats):   # interleaved, so a change in the machine's load hits every variant
        for k, (fn, _, _) in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            runs[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in runs.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    images = len(data.train_x) + len(data.test_x)
    out = {"seconds": med, "speedup_vs_torch": {k: med[b] / med[k] for k, (_, _, b) in variants.items()},
           "cpu_seconds": med_cpu,
           "cpu_speedup_vs_torch": {k: med_cpu[b] / med_cpu[k] for k, (_, _, b) in variants.items()},
           "us_per_image_replica": {k: 1e6 * v / (images * a.seeds) for k, v in med.items()},
           "paths": {k: p for k, (_, p, _) in variants.items()}, "seeds": a.seeds, "images": images,
           "repeats": a.repeats, "load_average": os.getloadavg(), "torch": torch.__version__,
           "numba": numba.__version__, "machine": platform.machine(),
           "threads": {"torch": torch.get_num_threads(), "NUMBA_NUM_THREADS": os.environ["NUMBA_NUM_THREADS"]},
           "note": "seconds (wall) and cpu_seconds (this process's CPU time: what a shared machine's load "
                   "does not inflate) for Population.evaluate on train + test; each ratio against the torch "
                   "evaluation of the same recipe (per_example_* against engine/evaluate.py's torch path), same run"}
    for k in variants:
        print(f"{k:>20}: {med[k]:.3f} s  {out['us_per_image_replica'][k]:5.2f} us per image-replica  "
              f"{out['speedup_vs_torch'][k]:5.2f}x  (CPU {med_cpu[k]:.3f} s, {out['cpu_speedup_vs_torch'][k]:5.2f}x)  "
              f"({out['paths'][k]})")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
