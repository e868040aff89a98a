"""Hyperparameter search: every trial trains on the one engine (engine/train.py) with a
validation split carved from the training set (data.val), reports its per-pass validation
error to the pruner, and is a run in the results store (kind "search"). The best trial is then
re-trained on the whole training set (data.val=0) with n seeds and reported on the test set once
(kind "search-best"). Nothing is chosen on the test set: trial records keep no test figures.
"""
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from . import study as st
from .space import load_space_file, parse_space

KIND, BEST_KIND = "search", "search-best"
SMOKE = ["data.n_train=400", "data.n_test=200", "train.passes=2"]  # and data.val=100 (--val)
SMOKE_SPACE = ["optim.lr=log:0.003:0.3"]


def base_config(preset: str, overrides: list):
    from ..config import apply_overrides, preset as get_preset
    return apply_overrides(get_preset(preset), overrides)


def default_val(cfg) -> int:
    """The preset's data.val, else a sixth of the training digits, at most 1000 (the presets were
    tuned on data.val=1000 of the 7,291)."""
    if cfg.data.val:
        return cfg.data.val
    from ..data import load_dataset
    n = len(load_dataset(cfg.data.source, cfg.data.n_train, cfg.data.n_test).train_x)
    return max(1, min(1000, n // 6))


def val_error(rec: dict) -> float:
    errs = [r["error"] for r in rec["val"]]
    return float(sum(errs) / len(errs))


def _no_test(obj):
    """A trial's summary or history without test figures (the search never looks at them)."""
    if isinstance(obj, dict):
        return {k: _no_test(v) for k, v in obj.items() if not k.startswith("test")}
    if isinstance(obj, list):
        return [_no_test(v) for v in obj]
    return obj


@dataclass
class TrialObjective:
    """objective(trial) for one study: picklable, so spawned workers and other machines build it
    from the study's stored spec. out: where per-slot checkpoint folders go; store: folder or URL."""
    preset: str
    items: list
    overrides: list
    out: str
    store: str
    study: str
    _space: object = field(default=None, repr=False, compare=False)

    def _parsed(self):
        if self._space is None:
            base = base_config(self.preset, self.overrides)
            self._space = (base, parse_space(self.items, base))
        return self._space

    def __call__(self, trial) -> float:
        o = st.optuna()
        from ..engine.checkpoint import has_checkpoint, load_checkpoint
        from ..engine.train import checkpoint_path, environment, train
        base, space = self._parsed()
        params = {d.name: d.suggest(trial) for d in space.dims}
        cfg = space.config(base, params)
        slot = int(trial.user_attrs[st.SLOT])
        folder = Path(self.out) / "trials" / _safe(self.study) / f"slot-{slot:04d}"  # shared by retries
        ckpt = checkpoint_path(cfg, folder)
        history = []
        if has_checkpoint(ckpt):  # a retried trial: the killed attempt's passes count, and are reported
            history = list(load_checkpoint(ckpt).get("history", []))
            for rec in history:
                trial.report(val_error(rec), rec["pass"])
        trial.set_user_attr("resumed_from_pass", history[-1]["pass"] if history else 0)
        info = {"study": self.study, "trial": trial.number, "slot": slot, "params": params, "objective": "val_error"}

        def on_pass(rec):
            history.append(rec)
            trial.report(val_error(rec), rec["pass"])
            trial.set_user_attr("passes", rec["pass"])
            if rec["pass"] < cfg.train.passes and trial.should_prune():  # after the last pass nothing is saved
                raise o.TrialPruned(f"pruned after pass {rec['pass']}")

        try:
            res = train(cfg, out=folder, resume=bool(history), on_pass=on_pass)
        except o.TrialPruned:
            v = val_error(history[-1])
            self._record(cfg, "pruned", {**info, "passes": history[-1]["pass"], "val_error": v,
                                         "config_digest": cfg.digest()}, history, environment())
            raise
        v = val_error(res.history[-1])
        if not math.isfinite(v):
            v = 100.0
        passes = res.history[-1]["pass"] if res.history else 0
        trial.set_user_attr("passes", passes)
        trial.set_user_attr("seconds", round(res.seconds, 3))
        self._record(cfg, res.status, {**_no_test(res.summary()), **info, "val_error": v}, res.history, environment())
        return v

    def _record(self, cfg, status, summary, history, env):
        from ..store import add_run, list_runs
        try:
            done = any(r["kind"] == KIND and r["summary"].get("study") == self.study
                       and r["summary"].get("slot") == summary["slot"] for r in list_runs(self.store))
        except UserError:  # no store yet
            done = False
        if not done:  # a retried trial whose killed attempt got this far is recorded once
            add_run(self.store, KIND, cfg.name, status, cfg.to_dict(), summary, _no_test(history), env)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def study_spec(preset, items, overrides, sampler, pruner, passes, out, store, trials):
    base = base_config(preset, overrides)
    space = parse_space(items, base)
    return {"kind": "hpo", "space": {"preset": preset, "overrides": list(overrides), **space.canonical()},
            "preset": preset, "items": list(items), "overrides": list(overrides), "sampler": sampler,
            "pruner": pruner, "passes": passes, "out": str(out), "store": str(store), "trials": trials}


def default_study_name(spec: dict) -> str:
    h = hashlib.sha256(json.dumps(spec["space"], sort_keys=True).encode()).hexdigest()[:8]
    return f"{spec['preset']}-{h}"


def grid_points(space, points: int) -> list:
    import itertools
    axes = [[(d.name, v) for v in d.grid(points)] for d in space.dims]
    return [dict(combo) for combo in itertools.product(*axes)]


def max_passes(base, space) -> int:
    dims = [d for d in space.dims if d.name == "train.passes"]
    return int(dims[0].extremes()[-1] if dims[0].kind != "choice" else max(dims[0].choices)) if dims \
        else base.train.passes


def summarize(study, spec) -> dict:
    """Counted trials (one a slot), the best COMPLETE one, the compute spent (passes trained)."""
    o = st.optuna()
    S = o.trial.TrialState
    slots = st.slot_trials(study)
    rows = []
    for k, t in slots.items():
        rows.append({"slot": k, "trial": t.number, "state": t.state.name.lower(), "value": t.value,
                     "params": dict(t.params), "passes": t.user_attrs.get("passes", 0),
                     "retried": "failed_trial" in t.system_attrs,
                     "resumed_from_pass": t.user_attrs.get("resumed_from_pass", 0)})
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    best = min(done, key=lambda r: (r["value"], r["trial"])) if done else None
    all_trials = study.get_trials(deepcopy=False)
    return {"trials": rows, "best": best, "complete": len(done),
            "pruned": sum(r["state"] == "pruned" for r in rows),
            "failed": sum(r["state"] == "fail" for r in rows),
            "running": sum(r["state"] == "running" for r in rows),
            "waiting": sum(r["state"] == "waiting" for r in rows),
            "attempts": sum(1 for t in all_trials if st.SLOT in t.user_attrs),
            "stale_failed": sum(1 for t in all_trials if t.state == S.FAIL and st.SLOT in t.user_attrs),
            "passes_trained": sum(r["passes"] for r in rows)}


def retrain_best(spec, best_params: dict, seeds: int, out, store, log=None) -> dict:
    """The best trial's config on the whole training set (data.val=0), `seeds` replicas, its
    test error reported once -> the run's summary (with run_id)."""
    from ..engine.train import environment, train
    from ..store import add_run, recorded_run
    base = base_config(spec["preset"], [o for o in spec["overrides"] if not o.startswith("data.val=")] + ["data.val=0"])
    space = parse_space(spec["items"], base)
    cfg = space.config(base, best_params)
    cfg.train.seeds = seeds
    from ..engine.checkpoint import has_checkpoint
    from ..engine.train import checkpoint_path
    res = train(cfg, out=out, resume=has_checkpoint(checkpoint_path(cfg, Path(out))), log=log)
    summary = {**res.summary(), "study": spec.get("study"), "params": best_params}
    run_id = recorded_run(store, BEST_KIND, summary["config_digest"], res.status)
    if run_id is None:
        run_id = add_run(store, BEST_KIND, cfg.name, res.status, res.config, summary, res.history, environment())
    summary["run_id"] = run_id
    return summary


def gather_items(items, space_file) -> list:
    out = list(items or [])
    if space_file:
        out += load_space_file(space_file)
    return out
