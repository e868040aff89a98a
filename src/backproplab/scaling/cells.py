"""One study cell from start to its store record: a learning-rate sweep of one model size
on one training-set size for one epoch budget.

The sweep: the family's base grid (factor 2 apart) trained at once as a population; if
the best rate sits at an edge of what was tried, `extend` more rates beyond that edge
(factor 2 again) are trained, up to `max_extend` times, so the kept rate is usually an
interior minimum. The best rate's validation loss is the cell's loss (seed 002 keeps
the best learning rate per cell).

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


def run_cell(cell: dict, spec: dict, data, out, log=None, hooks=None) -> dict:
    """Train the cell's sweep (resuming), write its record, return it.

    cell: family, size, n_train, epochs, key. spec: study settings (see study.study_spec).
    data: (train_x, train_labels, val_x, val_labels) tensors, training set already in the
    study's fixed order (the cell uses its first n_train examples)."""
    tx, ty, vx, vy = data
    n = cell["n_train"]
    x, y = tx[:n], ty[:n]
    m = member(cell["family"], cell["size"])
    ckpt, sweep_file = _scratch(out, cell["key"])
    done = json.loads(sweep_file.read_text())["populations"] if sweep_file.is_file() else []
    t_cell = time.perf_counter()
    while True:
        rates = _next_rates(done, spec)
        if not rates:
            break
        tr = CellTrainer(m, rates, x, y, cell["epochs"], optim=spec["optim"], batch=spec["batch"],
                         momentum=spec["momentum"], weight_decay=spec["weight_decay"], seed=spec["seed"],
                         ckpt=ckpt, ckpt_seconds=spec["ckpt_seconds"], ckpt_steps=spec.get("ckpt_steps"),
                         methods=spec_methods(spec),
                         tag=f"{cell['key']}|{','.join(f'{r:.6g}' for r in rates)}")
        if hooks and hooks.get("on_batch"):
            tr.on_batch = hooks["on_batch"]
        c0 = time.process_time()
        sec = tr.run()
        ev = tr.evaluate(vx, vy)
        res = []
        for lr, e in zip(rates, ev):
            bad = not math.isfinite(e["loss"]) or e["loss"] > DIVERGED_LOSS
            res.append({"lr": lr, "val_loss": None if bad else e["loss"], "val_error": e["error"],
                        "status": "diverged" if bad else "finished"})
        done.append({"results": res, "seconds": sec, "cpu_seconds": time.process_time() - c0,
                     "steps": tr.steps, "resumed_from_step": tr.resumed_from, "examples": tr.seen()})
        atomic_write_bytes(sweep_file, json.dumps({"key": cell["key"], "populations": done}).encode())
        remove_checkpoint(ckpt)
    record = _record(cell, spec, m, done, time.perf_counter() - t_cell)
    add_run(out, KIND, cell["key"], record["status"], record["config"], record["summary"], [], spec["env"])
    drop_scratch(out, cell["key"])
    if log:
        log(record)
    return record


def _record(cell, spec, m, done, wall) -> dict:
    res = sorted((r for pop in done for r in pop["results"]), key=lambda r: r["lr"])
    ok = [r for r in res if r["status"] == "finished"]
    examples = done[0]["examples"]
    best = min(ok, key=lambda r: r["val_loss"]) if ok else None
    lrs = [r["lr"] for r in res]
    summary = {
        "family": cell["family"], "size": cell["size"], "N": m.params, "n_train": cell["n_train"],
        "epochs": cell["epochs"], "D": examples, "C": float(m.train_flops) * examples,
        "flops_per_example": m.train_flops, "macs": m.macs, "shape": m.shape,
        "lr": best and best["lr"], "loss": best and best["val_loss"], "val_loss": best and best["val_loss"],
        "val_error": best and best["val_error"], "test_error": best and best["val_error"],
        "best_at_edge": bool(best and best["lr"] in (lrs[0], lrs[-1])), "sweep": res,
        "steps": done[0]["steps"], "populations": len(done),
        "seconds": sum(p["seconds"] for p in done), "cpu_seconds": sum(p["cpu_seconds"] for p in done),
        "wall_seconds_this_process": wall, "resumed": any(p["resumed_from_step"] for p in done)}
    config = {k: spec[k] for k in ("optim", "batch", "momentum", "weight_decay", "seed", "data", "n_val",
                                   "lrs", "extend", "max_extend", "digest")}
    if spec.get("methods"):
        config["methods"] = spec["methods"]
    config.update({"family": cell["family"], "size": cell["size"], "n_train": cell["n_train"],
                   "epochs": cell["epochs"], "cell": cell["key"]})
    return {"status": "finished" if ok else "diverged", "config": config, "summary": summary}


# -- worker processes ---------------------------------------------------------------------
_DATA = {}


def worker_init(source, n_val, order_seed, parent_pid=None):
    if parent_pid is not None:
        from ..experiments.pool import die_with_parent
        die_with_parent(parent_pid)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _DATA["data"] = study_data(source, n_val, order_seed)


def worker_run(cell, spec, out):
    return run_cell(cell, spec, _DATA["data"], out)


def data_fingerprint(data) -> str:
    h = hashlib.sha256()
    for t in data:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def study_data(source, n_val, order_seed):
    """(train_x, train_labels, val_x, val_labels): the training set in a fixed random order
    (nested subsets: the first n of it for every n), validation = the first n_val test examples."""
    from ..data import load_dataset
    ds = load_dataset(source)
    perm = torch.from_numpy(np.random.default_rng(order_seed).permutation(len(ds.train_labels)))
    nv = len(ds.test_labels) if n_val is None else min(n_val, len(ds.test_labels))
    return (ds.train_x[perm].contiguous(), ds.train_labels[perm].contiguous(), ds.test_x[:nv].contiguous(),
            ds.test_labels[:nv].contiguous())
