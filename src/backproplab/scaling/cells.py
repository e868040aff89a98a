"""One study cell from start to its store record: a learning-rate sweep of one model size
on one training-set size for one epoch budget, every rate trained for each of the study's
seeds.

Data: validation is carved from the training set (the last n_val training examples, default
1,000, as data.val does elsewhere: Dataset.with_validation); the cells train on the rest, in
nested subsets (seed k's subset of n is the first n of a permutation of the rest keyed by
k); the test set is read once per cell, after the rate is chosen, and only reported.

The sweep: the family's base grid (factor 2 apart) trained at once as a population of
rates x sweep seeds; each rate's validation loss is the mean over the sweep seeds (a rate at
which any of them diverged counts as diverged); if the best rate sits at an edge of what was
tried, `extend` more rates beyond that edge (factor 2 again) are trained, up to `max_extend`
times, so the kept rate is usually an interior minimum. The sweep seeds are the first
`rate_seeds` of the study's seeds (spec["rate_seeds"]; all of them when absent); the other
seeds then train at the chosen rate only, as one more population. The chosen rate's mean
validation loss over every seed is the cell's loss (seed 002 keeps the best learning rate per
cell); its test loss and error, per seed and mean, are recorded as reported figures. The
test set is evaluated after each population, once its best rate by validation is known, and
only that rate's test figures are kept: no choice reads them.

Sweeping on one seed and replicating the chosen rate costs L + S - 1 replicas a cell instead
of L x S (5 against 9 for 3 rates and 3 seeds; a step of R replicas costs about R times one
at the larger sizes). The chosen rate is then the best of seed 0's curve, so seed 0's loss
there is slightly optimistic (the minimum of L noisy values) while the other seeds' are not.

Resume: each population checkpoints on its own (trainer.py) and the results of finished
populations are kept in a small JSON file beside it, so a killed cell continues with
the population it was in. The cell's record is written to the store in one
transaction (one row per cell, every rate's result inside it), then the files go.
"""
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..engine.checkpoint import atomic_write_bytes, remove_checkpoint
from ..store import add_run
from .families import member
from .trainer import CellTrainer, spec_methods

KIND = "scale"
DIVERGED_LOSS = 1e3      # a validation loss above this (or non-finite) counts as diverged


def cell_key(family, size, n_train, epochs, digest) -> str:
    return f"{family}-s{size}-n{n_train}-e{epochs:g}-{digest[:10]}"


def _scratch(out: Path, key: str, make=True) -> tuple[Path, Path]:
    folder = Path(out) / "scale_ckpt"
    if make:
        folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.ckpt", folder / f"{key}.sweep.json"


def drop_scratch(out, key) -> None:
    ckpt, sweep_file = _scratch(out, key, make=False)
    remove_checkpoint(ckpt)
    sweep_file.unlink(missing_ok=True)


def _next_rates(done: list[dict], spec) -> list[float]:
    """Rates still to try after the populations in `done` (empty when the sweep is over)."""
    if not done:
        return list(spec["lrs"])
    if len(done) > spec["max_extend"]:
        return []
    res = [r for pop in done for r in pop["results"]]
    lrs = sorted({r["lr"] for r in res})
    ok = [r for r in res if r["status"] == "finished"]
    if not ok:
        return []
    best = min(ok, key=lambda r: r["val_loss"])["lr"]
    k = spec["extend"]
    if best == lrs[-1]:
        return [best * 2.0 ** (i + 1) for i in range(k)]
    if best == lrs[0]:
        return [best * 2.0 ** -(i + 1) for i in range(k)]
    return []


def seed_subsets(n_pool: int, seeds, n: int) -> list[np.ndarray]:
    """Per seed: the indices (into the training pool) of its nested subset of n examples."""
    return [np.random.default_rng(int(s)).permutation(n_pool)[:n] for s in seeds]


def _mean(v):
    return float(np.mean(v))


def _sd(v):
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def _results(rates, seeds, ev) -> list[dict]:
    """Per rate: the seeds' validation figures (ev seed-major, trainer.replica) and their means."""
    L, out = len(rates), []
    for j, lr in enumerate(rates):
        e = [ev[k * L + j] for k in range(len(seeds))]
        losses, errors = [x["loss"] for x in e], [x["error"] for x in e]
        bad = [not math.isfinite(v) or v > DIVERGED_LOSS for v in losses]
        out.append({"lr": lr, "val_loss": None if any(bad) else _mean(losses),
                    "val_loss_seeds": [None if b else v for b, v in zip(bad, losses)],
                    "val_error": _mean(errors), "val_error_seeds": errors,
                    "diverged_seeds": int(sum(bad)), "status": "diverged" if any(bad) else "finished"})
    return out


def _best(results):
    """The finished rate of lowest mean validation loss (ties: the lower rate), or None."""
    ok = sorted((r for r in results if r["status"] == "finished"), key=lambda r: r["lr"])
    return min(ok, key=lambda r: r["val_loss"]) if ok else None


def sweep_seeds(spec) -> tuple[list, list]:
    """(the seeds every rate of the sweep trains, the seeds trained at the chosen rate only)."""
    seeds = list(spec["seeds"])
    k = int(spec.get("rate_seeds") or len(seeds))
    return seeds[:k], seeds[k:]


def _swept(done) -> list[dict]:
    """Every rate's result from the sweep's populations (not the chosen rate's replication)."""
    return [r for p in done if not p.get("replicate") for r in p["results"]]


def run_cell(cell: dict, spec: dict, data, out, log=None, hooks=None, store=None) -> dict:
    """Train the cell's sweep (resuming), write its record (to the results store `store`, a
    folder or URL; default out, which holds the sweep's scratch files either way), return it.

    cell: family, size, n_train, epochs, key. spec: study settings (see study.make_study).
    data: (train_x, train_labels, val_x, val_labels, test_x, test_labels) tensors (study_data):
    the training pool without the validation split; each seed trains on its subset of it."""
    tx, ty, vx, vy, sx, sy = data
    n, seeds = cell["n_train"], spec["seeds"]
    subs = seed_subsets(len(ty), seeds, n)
    xs, ys = [tx[i] for i in subs], [ty[i] for i in subs]
    swept, rest = sweep_seeds(spec)
    m = member(cell["family"], cell["size"])
    ckpt, sweep_file = _scratch(out, cell["key"])
    done = json.loads(sweep_file.read_text())["populations"] if sweep_file.is_file() else []
    t_cell = time.perf_counter()

    def train(rates, pop_seeds, tag, replicate=False):
        """One population: `rates` x `pop_seeds`, resuming its checkpoint, its results kept in
        the sweep file (replicate: the chosen rate for the seeds the sweep left out)."""
        at = [seeds.index(s) for s in pop_seeds]
        tr = CellTrainer(m, rates, [xs[i] for i in at], [ys[i] for i in at], cell["epochs"], optim=spec["optim"],
                         batch=spec["batch"], momentum=spec["momentum"], weight_decay=spec["weight_decay"],
                         seeds=pop_seeds, ckpt=ckpt, ckpt_seconds=spec["ckpt_seconds"],
                         ckpt_steps=spec.get("ckpt_steps"), methods=spec_methods(spec), tag=tag)
        if hooks and hooks.get("on_batch"):
            tr.on_batch = hooks["on_batch"]
        c0 = time.process_time()
        sec = tr.run()
        res = _results(rates, pop_seeds, tr.evaluate(vx, vy))
        best = _best(res)
        test = None
        if best is not None:               # chosen on validation above; the test set only reports it
            j = rates.index(best["lr"])
            te = tr.evaluate(sx, sy)
            te = [te[tr.replica(k, j)] for k in range(len(pop_seeds))]
            test = {"lr": best["lr"], "loss_seeds": [x["loss"] for x in te], "error_seeds": [x["error"] for x in te]}
        entry = {"results": res, "test_of_best": test, "seconds": sec, "cpu_seconds": time.process_time() - c0,
                 "steps": tr.steps, "resumed_from_step": tr.resumed_from, "examples": tr.seen()}
        if replicate:
            entry["replicate"] = True
        done.append(entry)
        atomic_write_bytes(sweep_file, json.dumps({"key": cell["key"], "populations": done}).encode())
        remove_checkpoint(ckpt)

    while True:
        rates = _next_rates([p for p in done if not p.get("replicate")], spec)
        if not rates:
            break
        train(rates, swept, f"{cell['key']}|{','.join(f'{r:.6g}' for r in rates)}")
    best = _best(_swept(done))
    if rest and best is not None and not any(p.get("replicate") for p in done):
        train([best["lr"]], rest, f"{cell['key']}|{best['lr']:.6g}|seeds {','.join(map(str, rest))}", True)
    record = _record(cell, spec, m, done, time.perf_counter() - t_cell, len(vy), len(sy))
    add_run(out if store is None else store, KIND, cell["key"], record["status"], record["config"], record["summary"],
            [], spec["env"])
    drop_scratch(out, cell["key"])
    if log:
        log(record)
    return record


def _chosen(done) -> tuple:
    """(the sweep's result at the chosen rate extended to every seed, or None; its test figures)."""
    best = _best(_swept(done))
    if best is None:
        return None, None
    test = next(p["test_of_best"] for p in done if not p.get("replicate") and p.get("test_of_best")
                and p["test_of_best"]["lr"] == best["lr"])
    rep = next((p for p in done if p.get("replicate")), None)
    if rep is None:
        return best, test
    r, rt = rep["results"][0], rep["test_of_best"]
    if rt is None:                    # a seed diverged at the chosen rate: the cell has no loss
        return None, None
    per, errs = best["val_loss_seeds"] + r["val_loss_seeds"], best["val_error_seeds"] + r["val_error_seeds"]
    full = {**best, "val_loss": _mean(per), "val_loss_seeds": per, "val_error": _mean(errs), "val_error_seeds": errs}
    return full, {"lr": best["lr"], "loss_seeds": test["loss_seeds"] + rt["loss_seeds"],
                  "error_seeds": test["error_seeds"] + rt["error_seeds"]}


def _record(cell, spec, m, done, wall, n_val, n_test) -> dict:
    res = sorted(_swept(done), key=lambda r: r["lr"])
    examples = done[0]["examples"]
    best, test = _chosen(done)
    lrs = [r["lr"] for r in res]
    swept, rest = sweep_seeds(spec)
    on = "mean validation loss over the seeds" if not rest else \
        f"mean validation loss over seed(s) {', '.join(map(str, swept))}; seed(s) {', '.join(map(str, rest))} " \
        f"trained at the chosen rate only"
    summary = {
        "family": cell["family"], "size": cell["size"], "N": m.params, "n_train": cell["n_train"],
        "epochs": cell["epochs"], "D": examples, "C": float(m.train_flops) * examples,
        "flops_per_example": m.train_flops, "macs": m.macs, "shape": m.shape,
        "seeds": list(spec["seeds"]), "sweep_seeds": swept, "n_val": n_val, "n_test": n_test,
        "validation": f"the last {n_val} training examples", "lr_chosen_on": on,
        "lr": best and best["lr"], "loss": best and best["val_loss"], "val_loss": best and best["val_loss"],
        "val_loss_seeds": best and best["val_loss_seeds"], "val_loss_sd": best and _sd(best["val_loss_seeds"]),
        "val_error": best and best["val_error"], "val_error_seeds": best and best["val_error_seeds"],
        "test_loss": test and _mean(test["loss_seeds"]), "test_loss_seeds": test and test["loss_seeds"],
        "test_error": test and _mean(test["error_seeds"]), "test_error_seeds": test and test["error_seeds"],
        "best_at_edge": bool(best and best["lr"] in (lrs[0], lrs[-1])), "sweep": res,
        "steps": done[0]["steps"], "populations": len(done),
        "seconds": sum(p["seconds"] for p in done), "cpu_seconds": sum(p["cpu_seconds"] for p in done),
        "wall_seconds_this_process": wall, "resumed": any(p["resumed_from_step"] for p in done)}
    config = {k: spec[k] for k in ("optim", "batch", "momentum", "weight_decay", "seeds", "data", "n_val",
                                   "split", "lrs", "extend", "max_extend", "digest")}
    for k in ("methods", "rate_seeds"):
        if spec.get(k):
            config[k] = spec[k]
    config.update({"family": cell["family"], "size": cell["size"], "n_train": cell["n_train"],
                   "epochs": cell["epochs"], "cell": cell["key"]})
    return {"status": "finished" if best else "diverged", "config": config, "summary": summary}


# -- worker processes ---------------------------------------------------------------------
_DATA = {}


def worker_init(source, n_val, parent_pid=None):
    if parent_pid is not None:
        from ..experiments.pool import die_with_parent
        die_with_parent(parent_pid)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _DATA["data"] = study_data(source, n_val)


def worker_run(cell, spec, out, store=None):
    return run_cell(cell, spec, _DATA["data"], out, store=store)


def data_fingerprint(data) -> str:
    h = hashlib.sha256()
    for t in data:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


DEFAULT_N_VAL = 1000     # as data.val=1000 elsewhere: the last 1,000 of the 7,291 training digits


def study_data(source, n_val=DEFAULT_N_VAL):
    """(train_x, train_labels, val_x, val_labels, test_x, test_labels): validation = the last
    n_val training examples (Dataset.with_validation, the carve-out data.val makes), training =
    the rest in the data's order (cells take per-seed subsets of it), test = the whole test split,
    read only for the reported figures."""
    from ..data import load_dataset
    from ..errors import UserError
    ds = load_dataset(source)
    n = len(ds.train_labels)
    if not 0 < n_val < n:
        raise UserError(f"--n-val {n_val} must leave training examples: the training set of {source} has {n}")
    ds = ds.with_validation(int(n_val))
    return tuple(t.contiguous() for t in (ds.train_x, ds.train_labels, ds.val_x, ds.val_labels,
                                          ds.test_x, ds.test_labels))
