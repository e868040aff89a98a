"""Speedrun: the 1989 net to the rung-5 test error in seconds on one core.

The recipe is the `speedrun` preset (config.py): Net1989 with ReLU and logits (rung 5's net:
the same 9,760 parameters and 1989 init) on the population engine, made of registered
methods: minibatches of 128, Adam (beta2 0.99), a linear warm-up times a linear decay to 0,
label smoothing, one-pixel shifts, and the softmax averaged over the 9 one-pixel shifts at
test time (the `tta` method). Any override or `+method=NAME` composes with it, so "does
SAM help the speedrun?" is `backproplab speedrun +method=sam`. Its values were chosen on a
validation split carved from the training set (scripts/tune_preset.py speedrun), never on the test
set. Each seed trains alone (timed) or all seeds as one population; the training seconds
are train()'s (every optimizer step and its data preparation), evaluation is timed apart.
"""
import copy
import time

import numpy as np

from ..data.sources import N_TRAIN_1989
from ..errors import UserError
from ..models.net1989 import MACS

# rung 5 (80 per-example passes) on the canonical split, 4 seeds, fast engine: `backproplab ladder --rungs 5`;
# the target when the output folder's store holds no full rung-5 run (rung5_target)
RUNG5_ERROR, RUNG5_SOURCE = 2.018, "rung 5, mean of 4 seeds, `backproplab ladder --rungs 5` (2.02 +- 0.19 %)"
RUNG5_PASSES, FLOP_STEP = 80, 3 * 2 * MACS  # per-example step: forward, input and weight gradients


def rung5_target(out) -> tuple:
    """-> (test error %, where it comes from): the latest finished full-size rung-5 ladder run in the
    store of `out`, else the measured RUNG5_ERROR."""
    from ..store import list_runs
    try:
        runs = [r for r in list_runs(out) if r["kind"] == "ladder" and r["name"] == "rung5"
                and r["status"] == "finished" and r["config"]["data"]["n_train"] is None
                and r["config"]["data"]["source"] == "mnist10k"]
    except (UserError, KeyError, TypeError):
        runs = []
    if not runs:
        return RUNG5_ERROR, RUNG5_SOURCE
    s = runs[-1]["summary"]
    return float(s["test_error"]), (f"rung 5 in this store (run {runs[-1]['id']}, {s.get('seeds', '?')} seeds, "
                                    f"{s['test_error']:.2f} +- {s.get('test_error_std', 0.0):.2f} %)")


def plain_errors(cfg, params, data) -> list:
    """Per-replica test error (percent) of the trained weights without the evaluation methods
    (test-time shifts): Net1989's forward on the unshifted test digits. None when a method
    changed the model (the plain forward would be another net)."""
    from ..engine.evaluate import evaluate
    from ..methods.registry import get_method
    if cfg.model.name != "net1989" or any(get_method(s.name).modnet for s in cfg.methods):
        return [None] * len(params)
    m = cfg.model
    return [r["error"] for r in evaluate(params, data.test_x, data.test_labels.long(), m.act, m.out_act,
                                         cfg.train.loss)]


def run_speedrun(cfg, data, seeds, population=False, log=print) -> dict:
    """Each seed alone (one timed train() per seed), or all seeds as one population."""
    from ..engine.train import train
    from ..report.progress import ProgressBar
    groups = [list(seeds)] if population else [[s] for s in seeds]
    per_seed, results = [], []
    from ..engine.kernelgrad import kernel_reason, warm_up
    if kernel_reason(cfg) is None:
        warm_up()  # loading the kernels is not training: the first seed is timed like the others
    for grp in groups:
        c = copy.deepcopy(cfg)
        c.train.seed, c.train.seeds = grp[0], len(grp)
        if grp != list(range(grp[0], grp[0] + len(grp))):
            raise UserError("a population's seeds must be consecutive")
        c0 = time.process_time()
        passes = ProgressBar(c.train.passes, label=f"seed {grp[0]}: pass" if len(grp) == 1 else "pass")
        res = train(c, data=data, progress=passes)
        cpu = time.process_time() - c0
        passes.clear()
        if res.status != "finished":
            raise UserError(f"speedrun seed {grp[0]}: {res.message}")
        results.append(res)
        plain = plain_errors(c, res.params, data)
        for r, s in enumerate(grp):
            f = res.final[r]
            per_seed.append({"seed": int(s), "test_error": f["test_error"], "test_error_no_tta": plain[r],
                             "train_seconds": res.seconds / len(grp), "cpu_seconds": cpu / len(grp),
                             "eval_seconds": res.eval_seconds / len(grp), "weights_sha256": f["weights_sha256"],
                             **({"val_error": f["val_error"]} if "val_error" in f else {})})
            log(f"seed {s}: test error {f['test_error']:.2f}%"
                + (f" (no test-time shifts {plain[r]:.2f}%)" if plain[r] is not None else "")
                + ("" if population else f", {res.seconds:.2f} s training"))
    err = np.array([p["test_error"] for p in per_seed])
    plain = [p["test_error_no_tta"] for p in per_seed]
    plain = np.array(plain, dtype=float) if None not in plain else None
    n = results[0].n_train
    steps = cfg.train.passes * -(-n // cfg.train.batch)
    wall = sum(r.seconds for r in results)
    out = {"config": cfg.to_dict(), "population": population, "seeds": len(per_seed), "per_seed": per_seed,
           "path": results[0].path, "n_train": n,
           "test_error": float(err.mean()), "test_error_std": float(err.std(ddof=1)) if len(err) > 1 else 0.0,
           "test_error_no_tta": None if plain is None else float(plain.mean()),
           "test_error_no_tta_std": None if plain is None or len(plain) < 2 else float(plain.std(ddof=1)),
           "train_seconds_total": wall, "train_cpu_seconds_total": sum(p["cpu_seconds"] for p in per_seed),
           "train_seconds_max_seed": None if population else max(p["train_seconds"] for p in per_seed),
           "train_seconds_per_seed": wall / len(per_seed),
           "eval_seconds_total": sum(r.eval_seconds for r in results),
           "steps": steps, "examples_per_seed": cfg.train.passes * n,
           "gflop_per_seed": cfg.train.passes * n * FLOP_STEP / 1e9}
    if "val_error" in per_seed[0]:
        v = np.array([p["val_error"] for p in per_seed])
        out.update(val_error=float(v.mean()), val_error_std=float(v.std(ddof=1)) if len(v) > 1 else 0.0)
    return out


def reference_step_seconds(data, steps: int = 300, engine: str = "eager") -> dict:
    """The per-example reference: rung 5 (ReLU, cross-entropy, AdamW, dropout 0.25, shifts, batch of
    one) on the project's eager engine (Net1989 nn ops, torch.optim.AdamW: the public reproduction's
    loop) or its fast engine (numba kernels, one replica), timed over `steps` steps after 20 untimed
    ones (the fast engine's compilation falls there). Its full run is 80 passes x 7,291 steps."""
    from ..config import preset
    from ..data import pass_randomness
    from ..models.net1989 import init_params
    cfg = preset("rung5")
    m, o, t = cfg.model, cfg.optim, cfg.train
    kw = dict(act=m.act, out_act=m.out_act, loss=t.loss, optim=o.name, weight_decay=o.weight_decay,
              betas=(o.beta1, o.beta2), eps=o.eps, dropout=m.dropout)
    params = [{k: v.numpy() for k, v in init_params(0).items()}]
    if engine == "eager":
        from ..engine.eager import EagerPopulation
        eng = EagerPopulation(params, **kw)
    else:
        from ..engine.fast import FastPopulation
        eng = FastPopulation(params, **kw)
    n = 20 + steps
    shifts, keep = pass_randomness(0, 0, n, t.shift, m.dropout)
    x = data.train_x[:n].reshape(-1, 16, 16).numpy()
    lab = data.train_labels[:n].numpy()
    if len(x) < n:
        raise UserError(f"--reference-steps {steps} needs {n} training digits, the data has {len(x)}")
    lr = np.full(n, o.lr, np.float32)
    eng.train_pass(x[:20], lab[:20], lr[:20], shifts[None, :20], keep[None, :20])
    t0, c0 = time.perf_counter(), time.process_time()
    eng.train_pass(x[20:], lab[20:], lr[20:], shifts[None, 20:], keep[None, 20:])
    wall, cpu = (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
    full = RUNG5_PASSES * N_TRAIN_1989  # the reference's steps on the canonical split
    return {"engine": engine, "steps_timed": steps, "step_seconds": wall, "step_cpu_seconds": cpu,
            "full_steps": full, "full_seconds": wall * full, "full_cpu_seconds": cpu * full}
