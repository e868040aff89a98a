"""Grids handed to the search workers: the runs of `effects` and the cells of `scale run` as
trials of an Optuna study, so any number of `backproplab search worker` processes on any number
of machines share them, each grid point run exactly once.

Each point is one slot (study.py): a trial enqueued before the workers start, marked with the
point's key as its slot and carrying the point itself (an effects run's whole config, a scale
cell and its study settings) in its user attributes, so a worker needs nothing but the study.
The workers are study.py's: heartbeats on a database storage, a SIGKILLed worker's point
retried by another (resuming its checkpoint when --out is a shared folder). The point's run
goes to the results store (a shared one: --store URL) once: effects runs are keyed by config
digest and status, scale cells by their key, and a retried point whose killed attempt got as
far as its record finds it there instead of writing another. After the workers finish, the
command that made the study reads the points' runs back from the store.
"""
import hashlib
import json
from dataclasses import dataclass

from ..errors import UserError
from ..store import where
from . import study as st

EFFECTS, SCALE = "effects-grid", "scale-grid"
KINDS = (EFFECTS, SCALE)
POINT = "point"


@dataclass
class GridObjective:
    """objective(trial) of a grid study: runs the trial's point -> its error (effects: seed-mean on
    the timing split; scale: the cell's validation loss). out: checkpoints; store: folder or URL."""
    kind: str
    out: str
    store: str

    def __call__(self, trial) -> float:
        point = trial.user_attrs[POINT]
        if self.kind == EFFECTS:
            from ..experiments.effects import run_point
            key = point["key"] if isinstance(point["key"], str) else tuple(point["key"])
            run_id, value = run_point(key, point["config"], self.out, self.store)
            trial.set_user_attr("run_id", run_id)
            return value
        from ..scaling.study import run_point
        return run_point(point["cell"], point["spec"], point["fingerprint"], self.out, self.store)


def study_name(prefix: str, space: dict) -> str:
    return f"{prefix}-{hashlib.sha256(json.dumps(space, sort_keys=True).encode()).hexdigest()[:10]}"


def open_grid(storage: st.StorageSpec, name: str, kind: str, space: dict, out, store):
    """Create (or continue) the grid study; another grid under the same name is refused."""
    return st.create_study(name, storage, {"kind": kind, "space": space, "out": str(out), "store": str(store)})


def run_grid(study, storage: st.StorageSpec, points: dict, objective: GridObjective, jobs: int, log=print) -> dict:
    """points: slot -> point (JSON-able). Enqueue the points not yet there, run `jobs` local workers
    (workers on other machines may join), -> slot -> its COMPLETE trial. Points still unfinished
    when the workers leave (a failed point, a running one on a journal whose worker died unseen)
    are one UserError naming them: the same command again, or `search worker`, runs what is left."""
    added = st.enqueue_points(study, {slot: ({}, {POINT: p}) for slot, p in points.items()})
    log(f"grid study {study.study_name} in {storage.describe()}: {len(points)} points ({added} new), "
        f"{jobs} local worker{'s' if jobs > 1 else ''}; on other machines: backproplab search worker "
        f"--storage URL --study {study.study_name}")
    codes = st.run_workers(storage, study.study_name, objective, jobs, "random", 0, None)
    o = st.optuna()
    trials = st.slot_trials(study)
    done = {s: t for s, t in trials.items() if s in points and t.state == o.trial.TrialState.COMPLETE}
    left = [s for s in points if s not in done]
    if left:
        states = ", ".join(f"{s} ({trials[s].state.name.lower() if s in trials else 'missing'})" for s in left[:6])
        dead = [c for c in codes if c not in (0, None)]
        raise UserError(f"grid study {study.study_name}: {len(left)} of {len(points)} points did not finish: {states}"
                        + (f"; worker exit codes {dead}" if dead else "")
                        + "; run the same command again (or search worker) to run them")
    return done


class EffectsRunner:
    """run_effects' runner: each batch of configs (singles, budgets, pairs) becomes points of one
    study; -> key -> Result read back from the store."""

    def __init__(self, storage, name, space, jobs, out, store, log=print):
        self.storage, self.jobs, self.out, self.store, self.log = storage, jobs, str(out), str(store), log
        self.study = open_grid(storage, name, EFFECTS, space, out, store)

    def kept_open(self):
        """The study's lease for the whole command: its later stages reach the joined workers."""
        return st.kept_open(self.storage, self.study.study_name)

    def __call__(self, cfgs: dict, label: str) -> dict:
        from ..experiments.effects import stored_result
        from ..store import list_runs
        slots = {self.slot(k): k for k in cfgs}
        points = {s: {"key": list(k) if isinstance(k, tuple) else k, "config": cfgs[k].to_dict()}
                  for s, k in slots.items()}
        self.log(f"effects: {len(points)} {label} handed to the grid study")
        done = run_grid(self.study, self.storage, points, GridObjective(EFFECTS, self.out, self.store), self.jobs,
                        self.log)
        by_id = {r["id"]: r for r in list_runs(self.store)}
        out = {}
        for s, k in slots.items():
            rec = by_id.get(done[s].user_attrs.get("run_id"))
            if rec is None or rec["kind"] != "effects-run" or rec["summary"].get("config_digest") != cfgs[k].digest():
                raise UserError(f"grid point {s}: its run {done[s].user_attrs.get('run_id')} is not in the results "
                                f"store {where(self.store)} (the workers wrote to another store?)")
            out[k] = stored_result(rec)
        return out

    @staticmethod
    def slot(key) -> str:
        return key if isinstance(key, str) else f"{key[0]}@{key[1]}"


class ScaleRunner:
    """run_study's runner: the cells to run as points of one study -> their store records."""

    def __init__(self, storage, name, space, jobs, out, store, fingerprint, log=print):
        self.storage, self.jobs, self.out, self.store, self.log = storage, jobs, str(out), str(store), log
        self.fingerprint = fingerprint
        self.study = open_grid(storage, name, SCALE, space, out, store)

    def __call__(self, cells: list, spec: dict) -> list:
        from ..scaling.study import cell_records
        shared = {k: v for k, v in spec.items() if k != "env"}  # each worker records its own environment
        points = {c["key"]: {"cell": c, "spec": shared, "fingerprint": self.fingerprint} for c in cells}
        run_grid(self.study, self.storage, points, GridObjective(SCALE, self.out, self.store), self.jobs, self.log)
        recs = cell_records(self.store)
        missing = [c["key"] for c in cells if c["key"] not in recs]
        if missing:
            raise UserError(f"grid study {self.study.study_name}: cell {missing[0]} finished but is not in the results "
                            f"store {where(self.store)} (the workers wrote to another store?)")
        return [recs[c["key"]] for c in cells]
