"""A scaling study: model sizes x training-set sizes x epoch budgets, each cell a
learning-rate sweep (cells.py), run `jobs` cells at a time, skipping cells already in
the store, trimmed to a time budget.

Data: validation is the last n_val (default 1,000) of the training examples, carved out as
data.val does; the cells train on the rest (6,291 of the embedded digits' 7,291); the test
set (2,007) is only reported, for each cell's chosen rate (cells.py).

Default grids (the embedded digits):
  convnet sizes 1..6 (N 2.2k to 79k; the 1989 net's 9.8k between sizes 2 and 3),
  vit sizes 1..6 (N 2.9k to 90k; size 2 is the 1989-matched micro-ViT),
  training-set sizes n/4, n/2, n of the training set left after the validation carve-out
  (1,573, 3,146 and 6,291 on the digits), epoch budgets 0.25 to 8 (x2),
  learning rates: SGD with momentum 2^-6..2^-4 for the convnet, AdamW 2^-9..2^-7 for the
  ViT (the middle three of the pilot grids 2^-7..2^-3 and 2^-10..2^-6, which put the optima
  inside), extended by one rate (factor 2) at an edge, up to 3 times, so the kept rate is
  an interior minimum as before; three rates rather than five keep the 3-seed study's
  cost down (a step of R replicas costs about R times one at the larger sizes, measured),
  seeds 0, 1, 2 (each its own init, training subset and epoch order): the rates are swept on
  seed 0 (rate_seeds=1, `--rate-seeds`), then seeds 1 and 2 train at the chosen rate, and
  the cell's loss is the 3 seeds' mean there (cells.py). --rate-seeds 3 sweeps every rate on
  every seed, the rate chosen on the 3 seeds' mean (9 replicas a cell against 5: 1.9x the time).
That is 6 x 3 x 6 = 108 cells of 3+ learning rates on seed 0 and the chosen rate on 2 more.

Time: before running, the cost of a step of each size is measured (a few steps, CPU
time of this process) and every cell projected as steps x time per step plus its
evaluation; the projection (sum over cells / jobs) is what --budget trims to, most
expensive cells first. Timings on a shared machine are noisy; the record keeps what
each cell really took.
"""
import concurrent.futures as cf
import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..store import check_store, is_url, list_runs, store_path
from .cells import DEFAULT_N_VAL, KIND, cell_key, drop_scratch, run_cell, study_data, worker_init, worker_run
from .families import FAMILIES, member

RECIPES = {  # optimizer, base learning-rate grid (factor 2), momentum
    "convnet": {"optim": "sgd", "lrs": [2.0 ** j for j in range(-6, -3)], "momentum": 0.9},
    "vit": {"optim": "adamw", "lrs": [2.0 ** j for j in range(-9, -6)], "momentum": 0.9},
}
DEFAULT_SIZES = (1, 2, 3, 4, 5, 6)
DEFAULT_EPOCHS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
DEFAULT_FRACTIONS = (0.25, 0.5, 1.0)     # of the available training set
SMOKE = {"sizes": (1, 2, 3), "n_train": (100, 200), "epochs": (0.5, 1.0), "n_val": 300, "lr_count": 2}
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_RATE_SEEDS = 1   # the rates are swept on the first seed; the others train at the chosen rate
SPLIT = "val=last n_val training examples; test reported only"   # part of the digest: older stores'
#                                                                  cells (validation on test) never mix in


def parse_budget(text) -> float | None:
    """'30m', '90s', '1.5h', '45' (seconds) -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--budget {text!r}: give a positive time like 30m, 90s or 1.5h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _floats(text, what) -> list[float] | None:
    if text is None:
        return None
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{what} {text!r}: expected comma-separated numbers") from None
    if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise UserError(f"--{what} {text!r}: every value must be a positive number")
    return sorted(set(vals))


@dataclass
class Study:
    family: str
    data: str
    sizes: list
    n_train: list
    epochs: list
    spec: dict                       # settings every cell shares (see study_spec)
    cells: list = field(default_factory=list)

    def describe(self) -> str:
        return (f"{self.family} sizes {','.join(map(str, self.sizes))} x training sets "
                f"{','.join(map(str, self.n_train))} x epochs {','.join(f'{e:g}' for e in self.epochs)} "
                f"x learning rates {','.join(f'{r:.4g}' for r in self.spec['lrs'])} (factor 2, extended at an edge) "
                f"x seeds {','.join(map(str, self.spec['seeds']))}"
                + (f" (rates swept on {','.join(map(str, self.spec['seeds'][:self.spec['rate_seeds']]))}, the others "
                   f"at the chosen rate)" if self.spec.get("rate_seeds") else ""))


def make_study(family, data="mnist10k", *, smoke=False, sizes=None, n_train=None, epochs=None, lrs=None,
               n_avail=None, n_val=None, batch=32, seeds=DEFAULT_SEEDS, ckpt_seconds=60.0, data_fingerprint="",
               methods=(), rate_seeds=DEFAULT_RATE_SEEDS) -> Study:
    """n_avail: training examples left after the validation carve-out; n_val: the carve-out
    (default 1,000; the smoke size 300); seeds: the seeds every cell trains; rate_seeds: how
    many of them (the lowest) sweep the rates, the rest training at the chosen rate only (None:
    all of them);
    methods: '+method=NAME[:k=v]' texts (or MethodSpecs) every cell adds to its recipe."""
    if family not in FAMILIES:
        raise UserError(f"--family {family!r}: choose one of {', '.join(FAMILIES)}")
    rec = RECIPES[family]
    sizes = _floats(sizes, "sizes") or list(SMOKE["sizes"] if smoke else DEFAULT_SIZES)
    if any(s != int(s) for s in sizes):
        raise UserError(f"--sizes: model sizes are integers, not {', '.join(f'{s:g}' for s in sizes)}")
    sizes = [int(s) for s in sizes]
    for s in sizes:
        member(family, s)                                    # a UserError for a size out of range
    epochs = _floats(epochs, "epochs") or list(SMOKE["epochs"] if smoke else DEFAULT_EPOCHS)
    ns = _floats(n_train, "n-train")
    if ns is None:
        ns = SMOKE["n_train"] if smoke else [round(f * n_avail) for f in DEFAULT_FRACTIONS]
    ns = sorted({int(v) for v in ns})
    if n_avail is not None and ns[-1] > n_avail:
        raise UserError(f"--n-train {ns[-1]} is larger than the {n_avail} training examples of {data} "
                        f"left after the validation carve-out")
    seeds = [int(v) for v in seeds]
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {','.join(map(str, seeds))}: give distinct seeds >= 0")
    k = len(seeds) if rate_seeds is None else int(rate_seeds)
    if not 1 <= k:
        raise UserError(f"--rate-seeds {rate_seeds}: sweep the rates on at least 1 seed")
    k = min(k, len(seeds))
    base = _floats(lrs, "lrs") or rec["lrs"]
    if smoke and lrs is None:
        mid = len(base) // 2
        base = base[mid - SMOKE["lr_count"] // 2: mid - SMOKE["lr_count"] // 2 + SMOKE["lr_count"]]
    spec = {"family": family, "optim": rec["optim"], "momentum": rec["momentum"], "weight_decay": 0.0,
            "batch": int(batch), "seeds": sorted(seeds), "data": str(data), "split": SPLIT,
            "n_val": int(n_val if n_val is not None else SMOKE["n_val"] if smoke else DEFAULT_N_VAL),
            "lrs": base, "extend": 1, "max_extend": 0 if smoke else 3, "ckpt_seconds": ckpt_seconds}
    if k < len(seeds):  # only when some seeds skip the sweep: --rate-seeds = all keeps the older cells' keys
        spec["rate_seeds"] = k
    if methods:  # only when given, so the default study keeps its cells' keys
        from ..methods.registry import parse_method
        from .trainer import cell_config
        specs = [parse_method(m[len("+method="):] if m.startswith("+method=") else m) if isinstance(m, str)
                 else m for m in methods]
        cell_config(member(family, sizes[0]), rec["optim"], batch, rec["momentum"], 0.0, (0.9, 0.999), 1e-8,
                    specs)                               # refused here, in one line, before anything trains
        spec["methods"] = [{"name": s.name, "options": dict(s.options)} for s in specs]
    # Cells of different settings never mix: the digest is part of every cell's key.
    spec["digest"] = hashlib.sha256(json.dumps({**{k: spec[k] for k in sorted(spec) if k != "ckpt_seconds"},
                                                "fingerprint": data_fingerprint}, sort_keys=True)
                                    .encode()).hexdigest()[:16]
    st = Study(family, str(data), sizes, ns, epochs, spec)
    st.cells = [{"family": family, "size": s, "n_train": n, "epochs": e, "key": cell_key(family, s, n, e, spec["digest"])}
                for s in sizes for n in ns for e in epochs]
    return st


def finished_keys(out) -> set:
    """Keys of the cells already recorded in the store under `out` (a folder or a store URL)."""
    return set(cell_records(out))


def cell_records(store) -> dict:
    """cell key -> its (first) record in the store (a folder or URL; none yet: {})."""
    if not is_url(store) and not store_path(store).is_file():
        return {}
    try:
        runs = list_runs(store)
    except UserError:
        if not is_url(store):
            raise
        check_store(store)            # an unreachable server or a foreign table says so again here
        return {}                     # a server with no runs table yet
    recs = {}
    for r in runs:
        if r["kind"] == KIND and isinstance(r["config"], dict):
            recs.setdefault(r["config"].get("cell"), r)
    return recs


_POINT_DATA: dict = {}


def run_point(cell: dict, spec: dict, fingerprint: str, out, store) -> float:
    """ONE cell of a study, as a grid worker runs it (search/grid.py): its sweep resumed from the
    scratch files in out, recorded once in store (a cell already recorded there, by a killed
    attempt that got that far, is not run again) -> the cell's validation loss (DIVERGED_LOSS
    for a cell whose every rate diverged). The data is loaded once a process and must be the
    data the study was made from (fingerprint)."""
    from ..engine.train import environment
    from .cells import DIVERGED_LOSS, data_fingerprint
    rec = cell_records(store).get(cell["key"])
    if rec is None:
        key = (spec["data"], spec["n_val"])
        if key not in _POINT_DATA:
            data = study_data(*key)
            if data_fingerprint(data) != fingerprint:
                raise UserError(f"scale cell {cell['key']}: the data {spec['data']} on this machine differs from "
                                f"the study's")
            _POINT_DATA[key] = data
        with one_thread():
            rec = run_cell(cell, {**spec, "env": environment()}, _POINT_DATA[key], out, store=store)
    loss = rec["summary"].get("loss")
    return float(loss) if loss is not None and math.isfinite(loss) else DIVERGED_LOSS


@contextlib.contextmanager
def one_thread():
    """Torch on one thread for the block, as in a pool worker (the setting is restored after):
    a cell uses one core, so --jobs is the number of cores a study takes."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def calibrate(study: Study, data, steps=6) -> dict:
    """size -> CPU seconds per training step of a cell's base populations (measured, this process):
    the sweep's rates x sweep seeds, plus the chosen rate x the other seeds scaled by replicas."""
    from .cells import sweep_seeds
    from .trainer import CellTrainer, spec_methods
    tx, ty = data[0], data[1]
    swept, rest = sweep_seeds(study.spec)
    L = len(study.spec["lrs"])
    out = {}
    with one_thread():
        for s in study.sizes:
            tr = CellTrainer(member(study.family, s), study.spec["lrs"], tx, ty, 1.0, optim=study.spec["optim"],
                             batch=study.spec["batch"], seeds=swept, methods=spec_methods(study.spec))
            tr.run(stop_after=2)                              # warm-up (allocations, first-call costs)
            c0 = time.process_time()
            tr.run(stop_after=steps)
            out[s] = (time.process_time() - c0) / steps * (1 + len(rest) / (L * len(swept)))
    return out


def project(study: Study, per_step: dict, n_val: int) -> None:
    """Adds 'projected_s' to every cell: its steps x time per step, plus evaluation (a forward
    pass of the validation and test sets, about a third of a training step per example)."""
    from ..data.sampler import examples_for
    b = study.spec["batch"]
    for c in study.cells:
        steps = math.ceil(examples_for(c["epochs"], c["n_train"]) / b)
        c["projected_s"] = per_step[c["size"]] * (steps + n_val / (3 * b))


def trim(cells: list, budget: float | None, jobs: int) -> tuple[list, list]:
    """Cheapest-first cells whose projected total / jobs fits the budget; -> (kept, dropped)."""
    if budget is None or not cells:
        return list(cells), []
    order = sorted(cells, key=lambda c: c["projected_s"])
    if order[0]["projected_s"] > budget:
        c = order[0]
        raise UserError(f"--budget {budget:g} s is too small for one cell: the cheapest "
                        f"({c['family']} size {c['size']}, {c['n_train']} examples, {c['epochs']:g} epochs) "
                        f"takes about {c['projected_s']:.1f} s here")
    kept, total = [], 0.0
    for c in order:
        if (total + c["projected_s"]) / jobs > budget:
            break
        kept.append(c)
        total += c["projected_s"]
    keys = {c["key"] for c in kept}
    return [c for c in cells if c["key"] in keys], [c for c in cells if c["key"] not in keys]


def run_study(study: Study, out, *, jobs=1, budget=None, plan_only=False, log=print, data=None,
              progress=None, store=None, runner=None) -> dict:
    """Run (or with plan_only, only project) the study's unfinished cells into `out`.
    progress(done, total) after each cell (a progress bar). store: the results store (a folder
    or URL; default out, which keeps the cells' scratch files either way). runner(cells, spec)
    -> their records: how the cells are trained (default: here, `jobs` at a time; search/grid.py
    hands them to Optuna workers)."""
    from ..engine.train import environment
    to_store = {} if store is None else {"store": store}     # run_cell's default: the store in out
    store = out if store is None else store
    check_store(store)                                        # a foreign or unreachable store: refuse first
    if not is_url(store):
        Path(store).mkdir(parents=True, exist_ok=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_store(out)                                          # a foreign runs.db: refuse before any work
    data = data or study_data(study.data, study.spec["n_val"])
    done = finished_keys(store)
    todo = [c for c in study.cells if c["key"] not in done]
    for c in study.cells:
        if c["key"] in done:                                  # killed after recording, before cleaning up
            drop_scratch(out, c["key"])
    per_step = calibrate(study, data) if todo else {}
    if todo:
        project(study, per_step, len(data[3]) + len(data[5]))
    kept, dropped = trim(todo, budget, jobs)
    proj = sum(c["projected_s"] for c in kept) / max(jobs, 1) if kept else 0.0
    where = str(store) if is_url(store) else str(store_path(store))
    summary = {"family": study.family, "data": study.data, "out": str(out), "store": where,
               "grid": study.describe(), "cells": len(study.cells), "already_done": len(study.cells) - len(todo),
               "to_run": len(kept), "dropped_by_budget": len(dropped), "jobs": jobs,
               "projected_seconds": proj, "calibration_s_per_step": per_step, "digest": study.spec["digest"]}
    log(f"scale run: {study.describe()}")
    log(f"{len(study.cells)} cells: {summary['already_done']} already in {_describe(store)}, {len(kept)} to run"
        + (f", {len(dropped)} dropped to fit --budget" if dropped else "")
        + (f"; projected {proj / 60:.1f} min on {jobs} worker(s) (CPU time measured here)" if kept else ""))
    if plan_only or not kept:
        summary.update({"ran": 0, "seconds": 0.0})
        return summary
    spec = {**study.spec, "env": environment()}
    order = sorted(kept, key=lambda c: -c["projected_s"])   # longest first: the workers finish together
    t0, n_done, records = time.perf_counter(), 0, []
    if progress:
        progress(0, len(kept))

    def report(rec):
        nonlocal n_done
        n_done += 1
        s = rec["summary"]
        lr = f"lr {s['lr']:.4g}{' (edge)' if s['best_at_edge'] else ''}" if s["lr"] else "all diverged"
        loss = (f"val loss {s['loss']:.4f} +- {s['val_loss_sd']:.4f}  error {s['val_error']:5.2f}%  "
                f"(test error {s['test_error']:5.2f}%, reported)") if s["loss"] is not None else ""
        log(f"[{n_done}/{len(kept)}] {study.family} size {s['size']} n {s['n_train']} epochs {s['epochs']:g}: "
            f"{lr}  {loss}  ({s['seconds']:.1f} s, {time.perf_counter() - t0:.0f} s elapsed)")
        if progress:
            progress(n_done, len(kept))

    if runner is not None:
        for rec in runner(order, spec):
            records.append(rec)
            report(rec)
    elif jobs <= 1:
        with one_thread():          # torch's default, every core, would oversubscribe a shared machine
            for c in order:
                records.append(run_cell(c, spec, data, out, **to_store))
                report(records[-1])
    else:
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=worker_init,
                                    initargs=(study.data, study.spec["n_val"], os.getpid())) as pool:
            futs = [pool.submit(worker_run, c, spec, out, store) for c in order]
            for f in cf.as_completed(futs):
                records.append(f.result())
                report(records[-1])
    summary.update({"ran": len(records), "seconds": time.perf_counter() - t0,
                    "cell_seconds": sum(r["summary"]["seconds"] for r in records),
                    "diverged_cells": sum(r["status"] != "finished" for r in records)})
    return summary


def _describe(store) -> str:
    if is_url(store):
        from ..store_pg import describe
        return describe(str(store))
    return str(store_path(store))
