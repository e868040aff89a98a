"""The 1989 step: eager per-example PyTorch against the fast engine, one thread, one process.

    python benchmarks/bench_1989.py [--steps N] [--repeats K] [--out FILE.json] [--quick]

Times, on the same data (the canonical training set, in order) and with an untimed
warm-up (numba compilation included there):
  eager   Net1989's nn ops, batch of one, loss.backward(); optimizer.step() (SGD 0.03)
  fast    FastPopulation, one replica (the solo kernel)
  pop N   FastPopulation with N replicas (N = 1, 8, 16, 32): models x steps per second
  modern  the modern recipe (ReLU, cross-entropy, AdamW, dropout, shifts), solo and 16
  sdlm    rung 1b: the paper's optimizer (stochastic diagonal Levenberg-Marquardt, scaled
          tanh, mse, lr 0.0005): the eager engine's sdlm path (EagerPopulation: autograd plus
          methods/sdlm.py's curvature, batch of one) against the fast engine, solo and 16
Each figure is the median of the repeats. A training step is 382 kFLOP (forward, input
gradients and weight gradients: 3 x 2 x 63,660 multiply-adds); the 23-pass replay is
167,693 steps, 64 GFLOP; its floor is that over the core's measured peak (16-lane fused
multiply-adds from registers). The machine may be shared: the JSON records the load
average, and only ratios within one run are meaningful.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

FLOP_STEP = 3 * 2 * 63_660          # 381,960
REPLAY_STEPS = 23 * 7291            # 167,693


def eager_seconds(x, labels, steps):
    """Per-example eager PyTorch, the public reproduction's loop: seconds for `steps` steps."""
    from backproplab.models.net1989 import Net1989
    model = Net1989(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    xt = torch.as_tensor(x).reshape(-1, 1, 16, 16)
    target = torch.full((len(x), 10), -1.0)
    target[torch.arange(len(x)), torch.as_tensor(labels)] = 1.0
    t0 = time.perf_counter()
    for i in range(steps):
        j = i % len(x)
        opt.zero_grad()
        loss = torch.mean((model(xt[j:j + 1]) - target[j:j + 1]) ** 2)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


MODERN = dict(act="relu", out_act="none", loss="ce", optim="adamw", weight_decay=0.01, dropout=0.25)
SDLM = dict(act="scaled_tanh", out_act="scaled_tanh", optim="sdlm", mu=0.02, gamma=0.01)   # rung 1b
SDLM_LR = 0.0005


def sdlm_seconds(x, labels, replicas, steps, eager=False):
    """Rung 1b's step (SDLM) on `replicas` replicas: the fast engine, or the eager engine's sdlm path."""
    from backproplab.engine.eager import EagerPopulation
    from backproplab.engine.fast import FastPopulation
    from backproplab.models.net1989 import init_params
    params = [{n: v.numpy() for n, v in init_params(s).items()} for s in range(replicas)]
    engine = (EagerPopulation if eager else FastPopulation)(params, **SDLM)
    lr = np.full(steps, SDLM_LR, np.float32)
    t0 = time.perf_counter()
    engine.train_pass(x[:steps], labels[:steps], lr)
    return time.perf_counter() - t0


def fast_seconds(x, labels, replicas, steps, modern=False):
    """The fast engine, `replicas` replicas, `steps` examples: the 1989 recipe, or the
    modern one (ReLU, cross-entropy, AdamW, dropout 0.25, shifts of 1 pixel)."""
    from backproplab.data import pass_randomness
    from backproplab.engine.fast import FastPopulation
    from backproplab.models.net1989 import init_params
    fp = FastPopulation([{n: v.numpy() for n, v in init_params(s).items()} for s in range(replicas)],
                        **(MODERN if modern else {}))
    xs, ls = x[:steps], labels[:steps]
    lr = np.full(len(xs), 3e-3 if modern else 0.03, np.float32)
    shifts = keep = None
    if modern:
        rand = [pass_randomness(s, 0, steps, 1, 0.25) for s in range(replicas)]
        shifts, keep = np.stack([r[0] for r in rand]), np.stack([r[1] for r in rand])
    t0 = time.perf_counter()
    fp.train_pass(xs, ls, lr, shifts, keep)
    return time.perf_counter() - t0


def peak_gflops():
    """The core's fused multiply-add peak: 8 independent 16-lane chains, registers only."""
    from numba import njit

    from backproplab.engine._simd import vfma, vload, vstore

    @njit
    def chains(n, a):
        x, y = vload(a, 0), vload(a, 16)
        c0, c1, c2, c3 = vload(a, 32), vload(a, 48), vload(a, 64), vload(a, 80)
        c4, c5, c6, c7 = vload(a, 96), vload(a, 112), vload(a, 128), vload(a, 144)
        for _ in range(n):
            c0, c1, c2, c3 = vfma(x, y, c0), vfma(x, y, c1), vfma(x, y, c2), vfma(x, y, c3)
            c4, c5, c6, c7 = vfma(x, y, c4), vfma(x, y, c5), vfma(x, y, c6), vfma(x, y, c7)
        for i, c in enumerate((c0, c1, c2, c3, c4, c5, c6, c7)):
            vstore(a, 32 + 16 * i, c)

    a = np.full(160, 0.5, np.float32)
    chains(10, a)
    best = min(_timed(lambda: chains(200_000, a)) for _ in range(30))
    return 200_000 * 8 * 16 * 2 / best / 1e9


def _timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="fast-engine steps per repeat (default 7291)")
    ap.add_argument("--eager-steps", type=int, default=None, help="eager steps per repeat (default 2000)")
    ap.add_argument("--pop-steps", type=int, default=None, help="population steps per repeat (default 1000)")
    ap.add_argument("--sdlm-eager-steps", type=int, default=None, help="eager sdlm steps per repeat (default 500)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats, median quoted (default 5)")
    ap.add_argument("--populations", default="1,8,16,32")
    ap.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args(argv)
    quick = a.quick
    steps = a.steps or (500 if quick else 7291)
    eager_steps = a.eager_steps or (100 if quick else 2000)
    pop_steps = a.pop_steps or (100 if quick else 1000)
    repeats = a.repeats or (2 if quick else 5)
    sdlm_eager_steps = a.sdlm_eager_steps or (30 if quick else 500)
    torch.set_num_threads(1)

    from backproplab.data import load_dataset
    from backproplab.engine._kernels_common import aligned_copy
    ds = load_dataset()
    x = aligned_copy(ds.train_x.reshape(-1, 16, 16).numpy())   # slices x[:steps] stay aligned: no copy per pass
    labels = ds.train_labels.numpy()
    if max(steps, pop_steps, sdlm_eager_steps) > len(x):
        ap.error(f"--steps, --pop-steps and --sdlm-eager-steps are at most {len(x)} (one pass, in order)")

    t0 = time.perf_counter()
    eager_seconds(x, labels, 20)
    pops = [int(p) for p in a.populations.split(",") if p]
    for r in sorted(set(pops) | {1}):
        fast_seconds(x, labels, r, 20)                      # compile both kernels, untimed
    fast_seconds(x, labels, 1, 20, True)
    fast_seconds(x, labels, 16, 20, True)
    sdlm_seconds(x, labels, 1, 20), sdlm_seconds(x, labels, 16, 20), sdlm_seconds(x, labels, 1, 5, eager=True)
    warmup = time.perf_counter() - t0

    eager = statistics.median(eager_seconds(x, labels, eager_steps) for _ in range(repeats)) / eager_steps
    fast = statistics.median(fast_seconds(x, labels, 1, steps) for _ in range(repeats)) / steps
    peak = peak_gflops()
    modern = statistics.median(fast_seconds(x, labels, 1, steps, True) for _ in range(repeats)) / steps
    modern16 = statistics.median(fast_seconds(x, labels, 16, pop_steps, True) for _ in range(repeats)) / pop_steps
    sdlm_eager = statistics.median(sdlm_seconds(x, labels, 1, sdlm_eager_steps, eager=True)
                                   for _ in range(repeats)) / sdlm_eager_steps
    sdlm = statistics.median(sdlm_seconds(x, labels, 1, steps) for _ in range(repeats)) / steps
    sdlm16 = statistics.median(sdlm_seconds(x, labels, 16, pop_steps) for _ in range(repeats)) / pop_steps
    pop = {}
    for r in pops:
        t = statistics.median(fast_seconds(x, labels, r, pop_steps) for _ in range(repeats)) / pop_steps
        pop[str(r)] = {"us_per_step": t * 1e6, "model_steps_per_s": r / t,
                       "us_per_replica_step": t * 1e6 / r, "per_replica_vs_solo": t / r / fast}
    floor = REPLAY_STEPS * FLOP_STEP / (peak * 1e9)
    res = {
        "eager_us_per_step": eager * 1e6, "fast_us_per_step": fast * 1e6, "speedup": eager / fast,
        "fast_gflops": FLOP_STEP / fast / 1e9, "eager_gflops": FLOP_STEP / eager / 1e9,
        "core_peak_gflops": peak, "replay_23_passes_s": fast * REPLAY_STEPS,
        "replay_eager_23_passes_s": eager * REPLAY_STEPS, "replay_flop_floor_s": floor,
        "replay_vs_floor": fast * REPLAY_STEPS / floor, "populations": pop,
        "modern_us_per_step": modern * 1e6, "modern_pop16_us_per_replica_step": modern16 * 1e6 / 16,
        "sdlm": {"eager_us_per_step": sdlm_eager * 1e6, "fast_us_per_step": sdlm * 1e6,
                 "speedup_vs_eager": sdlm_eager / sdlm, "fast_vs_fast_sgd": sdlm / fast,
                 "pop16_us_per_replica_step": sdlm16 * 1e6 / 16, "replay_23_passes_s": sdlm * REPLAY_STEPS},
        "steps": {"fast": steps, "eager": eager_steps, "population": pop_steps, "sdlm_eager": sdlm_eager_steps},
        "repeats": repeats,
        "warmup_s": warmup, "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()),
        "machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
        "numba": __import__("numba").__version__,
    }
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
