"""Studies on Optuna: storage, slots, workers. No scheduler or queue of our own: Optuna's storage
holds the trials; each worker process loads the study and runs trials until none is left.

A study of N trials is N *slots* enqueued before any worker starts (enqueue_trial with the mark
user_attrs["slot"]; a grid's slots carry their point's parameters, a sampled search's carry none
and the sampler fills them when a worker draws one). A worker runs WAITING trials; a trial drawn
without a slot (two workers raced for the last one) is marked surplus, pruned at once and not
counted. So every slot is one trial, with any number of workers on any number of machines.

Storage: a journal file (Optuna's JournalFileBackend; one machine, no heartbeat: a trial a
killed worker left RUNNING is retried only when the process that started that worker saw it
die, by run_workers, which then starts the workers again) or an SQLAlchemy URL (postgresql+psycopg://...) as RDBStorage with
a heartbeat: a SIGKILLed worker's trial turns stale, a live worker marks it FAIL and
RetryHeartbeatStaleTrialCallback enqueues it again with the same parameters and slot, so another
worker runs it. Workers on a heartbeat storage wait for RUNNING trials to finish or go stale
before they leave, so the last stale trial is retried too.

API for any search (hyperparameters, architectures):
  study = create_study(name, storage, spec, direction)       (spec: what workers need, JSON-able)
  enqueue_slots(study, n) / enqueue_grid(study, points) / enqueue_points(study, {slot: (params, attrs)})
  run_workers(storage, name, objective, jobs, sampler=..., pruner=...)
  run_study(name, storage, objective, n_trials | grid=points, jobs, sampler, pruner, spec)
objective(trial) -> float is a picklable callable (worker processes start from a fork server).
"""
import contextlib
import multiprocessing
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

SLOT = "slot"
SURPLUS = "surplus"
STARTED = "started"  # the attempt's own trial number, set once its objective ran (after its first heartbeat)
HEARTBEAT_S = 10.0
# A grid whose command may still enqueue points (effects' pairs and budget runs, chosen when the
# singles are done) says so with this study attribute: the time until which workers that joined from
# elsewhere (`search worker`) wait for more points instead of leaving. The command renews it every
# OPEN_LEASE_S / 4 seconds while it runs and clears it at the end; a command that dies stops renewing,
# and the waiting workers leave OPEN_LEASE_S later.
OPEN_UNTIL = "open_until"
OPEN_LEASE_S = 60.0
OPEN_POLL_S = 1.0    # how often a waiting worker looks for new points
SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("none", "asha", "hyperband")


def optuna():
    try:
        import optuna as o
    except ImportError:
        raise UserError("search needs Optuna: pip install -e '.[search]'") from None
    o.logging.set_verbosity(o.logging.WARNING)
    return o


SCHEMA_RETRIES = 5   # StorageSpec.open: attempts after a collision creating a new database's tables


@dataclass(frozen=True)
class StorageSpec:
    """Where a study lives, as text a worker process (or another machine) can open again."""
    url: str                       # a journal file path, or an SQLAlchemy URL
    heartbeat: float = HEARTBEAT_S

    @property
    def is_journal(self) -> bool:
        return "://" not in self.url

    def describe(self) -> str:
        if self.is_journal:
            return f"journal {self.url}"
        return _host(self.url)

    def open(self):
        o = optuna()
        if self.is_journal:
            from optuna.storages.journal import JournalFileBackend
            try:
                Path(self.url).parent.mkdir(parents=True, exist_ok=True)
                return o.storages.JournalStorage(JournalFileBackend(self.url))
            except OSError as e:
                raise UserError(f"cannot open study journal {self.url}: {e.strerror or e}") from None
        import sqlalchemy as sa
        kw = {}
        if self.url.startswith("postgresql"):
            kw = {"connect_args": {"connect_timeout": 10}}
        try:
            for attempt in range(SCHEMA_RETRIES + 1):
                try:
                    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5.0
                        warnings.simplefilter("ignore", o.exceptions.ExperimentalWarning)
                        return o.storages.RDBStorage(
                            self.url, engine_kwargs=kw, heartbeat_interval=max(1, int(round(self.heartbeat))),
                            grace_period=max(2, int(round(3 * self.heartbeat))),
                            heartbeat_stale_trial_callback=retry_callback())
                except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
                    # Optuna creates its tables on a database's first open; processes opening a new
                    # database at once collide there (duplicate type or table). The tables exist
                    # once one of them has won: open again.
                    if attempt == SCHEMA_RETRIES:
                        raise
                    time.sleep(0.2 * (attempt + 1))
        except (sa.exc.SQLAlchemyError, ImportError, ValueError) as e:
            msg = str(getattr(e, "orig", None) or e).strip().splitlines()
            raise UserError(f"cannot reach study storage at {_host(self.url)}: "
                            f"{msg[0] if msg else type(e).__name__}") from None


def retry_callback():
    """Optuna's stale-trial retry (FAIL, then the same parameters and attributes enqueued again), at
    most 3 retries a slot; marked experimental in Optuna 5.0, so its warning is not repeated."""
    o = optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", o.exceptions.ExperimentalWarning)
        return o.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)


def storage_spec(url: str | None, out, heartbeat: float = HEARTBEAT_S) -> StorageSpec:
    """None -> OUT/search.journal; a path -> that journal; postgresql:// names psycopg 3."""
    if url is None:
        return StorageSpec(str(Path(out).resolve() / "search.journal"), heartbeat)
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if "://" not in url:
        url = str(Path(url).resolve())
    return StorageSpec(url, heartbeat)


def _host(url: str) -> str:
    try:
        import sqlalchemy as sa
        u = sa.engine.make_url(url)
        if u.drivername.startswith("sqlite"):
            return f"sqlite {u.database}"
        return f"{u.host or 'localhost'}:{u.port or 5432}"
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is named without credentials
        return url.split("@")[-1]


def _int_options(flag: str, text: str, name: str, rest: str, opts: dict, allowed: dict) -> None:
    """opts (the defaults) updated in place from rest, 'key=N,...' after NAME: in `--flag NAME:rest`;
    allowed: option -> help. A key not allowed or a value not a whole number: a one-line UserError."""
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if key not in allowed or not eq:
            known = ", ".join(f"{k} ({v})" for k, v in allowed.items())
            raise UserError(f"{flag} {text}: {item!r} is not an option of {name}" + (f"; options: {known}" if known else ""))
        try:
            opts[key] = int(value)
        except ValueError:
            raise UserError(f"{flag} {text}: {key}={value!r} is not an integer") from None


SAMPLER_OPTIONS = {"startup": "random trials before TPE models the space (default 10, Optuna's)",
                   "multivariate": "0: one density a parameter; 1: one joint density (Optuna's default for "
                                   "one objective, so also what plain tpe does)"}


def parse_sampler(text: str) -> tuple[str, dict]:
    """'tpe', 'tpe:startup=5,multivariate=1', 'random', 'grid' or 'cmaes' -> (name, {option: int});
    only tpe takes options (SAMPLER_OPTIONS)."""
    name, _, rest = text.partition(":")
    if name not in SAMPLERS:
        raise UserError(f"--sampler {text}: choose one of {', '.join(SAMPLERS)} (tpe takes "
                        f":startup=N,multivariate=0|1)")
    opts = {"startup": 10, "multivariate": None} if name == "tpe" else {}   # None: Optuna's own choice
    _int_options("--sampler", text, name, rest, opts, SAMPLER_OPTIONS if name == "tpe" else {})
    if name == "tpe" and (opts["startup"] < 1 or opts["multivariate"] not in (None, 0, 1)):
        raise UserError(f"--sampler {text}: startup must be >= 1 and multivariate 0 or 1")
    return name, opts


def make_sampler(text: str, seed: int | None):
    """The Optuna sampler parse_sampler(text) names, seeded."""
    o = optuna()
    name, opts = parse_sampler(text)
    if name == "tpe":
        with warnings.catch_warnings():   # multivariate TPE is marked experimental in Optuna
            warnings.simplefilter("ignore", o.exceptions.ExperimentalWarning)
            mv = opts["multivariate"]
            return o.samplers.TPESampler(seed=seed, n_startup_trials=opts["startup"],
                                         multivariate=None if mv is None else bool(mv))
    if name in ("random", "grid"):  # a grid's trials are enqueued points: the sampler is never asked
        return o.samplers.RandomSampler(seed=seed)
    try:
        import cmaes  # noqa: F401
    except ImportError:
        raise UserError("--sampler cmaes needs the cmaes package: pip install cmaes") from None
    return o.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


PRUNER_OPTIONS = {"min": "passes before the first rung (default 1)",
                  "factor": "reduction factor: 1 in factor trials goes on at each rung (default 3)"}


def parse_pruner(text: str) -> tuple[str, dict]:
    """'asha' or 'asha:min=3,factor=2' (the same for hyperband) -> (name, {option: int})."""
    name, _, rest = text.partition(":")
    if name not in PRUNERS:
        raise UserError(f"--pruner {text}: choose one of {', '.join(PRUNERS)} (asha and hyperband take "
                        f":min=PASSES,factor=K)")
    opts = {"min": 1, "factor": 3}
    _int_options("--pruner", text, name, rest, opts, {} if name == "none" else PRUNER_OPTIONS)
    if opts["min"] < 1 or opts["factor"] < 2:
        raise UserError(f"--pruner {text}: min must be >= 1 and factor >= 2")
    return name, opts


def make_pruner(text: str, max_resource: int):
    """text as parse_pruner takes it; max_resource: a trial's passes."""
    o = optuna()
    name, opts = parse_pruner(text)
    if name == "none":
        return o.pruners.NopPruner()
    if opts["min"] > max_resource:
        raise UserError(f"--pruner {text}: min={opts['min']} passes is more than a trial's {max_resource}")
    if name == "asha":
        return o.pruners.SuccessiveHalvingPruner(min_resource=opts["min"], reduction_factor=opts["factor"])
    return o.pruners.HyperbandPruner(min_resource=opts["min"], max_resource=max(1, max_resource),
                                     reduction_factor=opts["factor"])


SPEC_ATTR = "backproplab"


def create_study(name: str, storage: StorageSpec, spec: dict, direction: str = "minimize"):
    """Create the study, or load it when it exists with the same spec['space']; another space
    under the same name is a UserError."""
    o = optuna()
    st = storage.open()
    study = o.create_study(study_name=name, storage=st, direction=direction, load_if_exists=True)
    have = study.user_attrs.get(SPEC_ATTR)
    if have is None:
        study.set_user_attr(SPEC_ATTR, spec)
    elif have.get("space") != spec.get("space") or have.get("kind") != spec.get("kind"):
        raise UserError(f"study {name!r} in {storage.describe()} exists with another search space; "
                        f"choose another --study name")
    return study


def load_study(name: str, storage: StorageSpec):
    o = optuna()
    st = storage.open()
    try:
        study = o.load_study(study_name=name, storage=st)
    except KeyError:
        raise UserError(f"no study {name!r} in {storage.describe()}") from None
    spec = study.user_attrs.get(SPEC_ATTR)
    if spec is None:
        raise UserError(f"study {name!r} in {storage.describe()} was not made by backproplab search")
    return study, spec


def _slots_present(study) -> set:
    o = optuna()
    return {t.user_attrs[SLOT] for t in study.get_trials(deepcopy=False) if SLOT in t.user_attrs
            and t.state != o.trial.TrialState.FAIL}


def enqueue_slots(study, n: int) -> int:
    """Slots 0..n-1 with no parameters (the sampler fills them), those not already there -> how many added."""
    have = _slots_present(study)
    todo = [k for k in range(n) if k not in have]
    for k in todo:
        study.enqueue_trial({}, user_attrs={SLOT: k})
    return len(todo)


def enqueue_grid(study, points: list) -> int:
    """A grid of parameter dicts: one slot each (each runs exactly once, whatever the workers)."""
    return enqueue_points(study, {k: (p, {}) for k, p in enumerate(points)})


def enqueue_points(study, points: dict) -> int:
    """points: slot -> (parameters, user attributes the trial carries); those whose slot is not
    there yet (or only as failed attempts) are enqueued -> how many."""
    have = _slots_present(study)
    todo = [k for k in points if k not in have]
    for k in todo:
        params, attrs = points[k]
        study.enqueue_trial(params, user_attrs={**attrs, SLOT: k})
    return len(todo)


class SlotObjective:
    """Wraps an objective: a trial without a slot (drawn after the last slot was taken) is pruned
    and marked surplus instead of run. Records the worker's pid on the trial (tests kill by it).

    On a heartbeat storage the first heartbeat is written here, before the pid: Optuna's own
    heartbeat thread races with the objective, and a trial whose worker dies before that thread's
    first write has no heartbeat at all, so Optuna never finds it stale (it would stay RUNNING and
    the other workers would wait for it forever). A trial with a pid therefore always has a
    heartbeat; one without a pid that stays RUNNING is handled by fail_unstarted_trials."""

    def __init__(self, objective):
        self.objective = objective

    def __call__(self, trial):
        o = optuna()
        if SLOT not in trial.user_attrs:
            trial.set_user_attr(SURPLUS, True)
            raise o.TrialPruned("no slot left")
        storage = trial.study._storage
        interval = getattr(storage, "get_heartbeat_interval", None)
        if interval is not None and interval() is not None:
            storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr(STARTED, trial.number)  # this attempt's number: a retry copies the attrs
        trial.set_user_attr("pid", os.getpid())
        return self.objective(trial)


UNSTARTED_GRACE_S = 60.0


def fail_unstarted_trials(study, grace: float) -> int:
    """RUNNING trials whose objective never started (no pid, hence no heartbeat: the worker died
    between taking the trial and its first heartbeat) for longer than `grace` seconds: marked FAIL
    and enqueued again with their parameters and slot, as the stale-trial callback does -> how many."""
    import datetime as dt
    o = optuna()
    S = o.trial.TrialState
    storage = study._storage
    now = dt.datetime.now()
    retry = retry_callback()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(S.RUNNING,)):
        if t.user_attrs.get(STARTED) == t.number or t.datetime_start is None:
            continue
        if (now - t.datetime_start.replace(tzinfo=None)).total_seconds() > grace:
            if storage.set_trial_state_values(t._trial_id, state=S.FAIL):
                retry(study, storage.get_trial(t._trial_id))
                n += 1
    return n


def _counts(study):
    o = optuna()
    S = o.trial.TrialState
    waiting = running = 0
    for t in study.get_trials(deepcopy=False, states=(S.WAITING, S.RUNNING)):
        if t.state == S.WAITING:
            waiting += 1
        else:
            running += 1
    return waiting, running


def worker_loop(storage: StorageSpec, name: str, objective, sampler_name: str = "tpe", seed: int | None = None,
                pruner=None, catch=(UserError,), after_trial=None, wait_open=False) -> int:
    """Run the study's waiting trials until none is left (on a heartbeat storage: until no trial is
    running either, retrying stale ones) -> trials this worker ran. after_trial(): called after each.
    wait_open: while the study's OPEN_UNTIL lease is current, wait for more trials instead of leaving
    (workers that joined a grid from elsewhere; never the command's own, which it waits for)."""
    o = optuna()
    study = o.load_study(study_name=name, storage=storage.open(), sampler=make_sampler(sampler_name, seed),
                         pruner=pruner)
    wrapped = SlotObjective(objective)
    ran, said = 0, False
    while True:
        waiting, running = _counts(study)
        if waiting:
            said = False
            study.optimize(wrapped, n_trials=1, catch=catch, gc_after_trial=False)
            ran += 1
            if after_trial is not None:
                after_trial()
            continue
        if storage.is_journal or not running:
            if wait_open and float(study.user_attrs.get(OPEN_UNTIL, 0.0)) > time.time():
                if not said:
                    print(f"study {name}: no point waiting; its command may add more: waiting", flush=True)
                    said = True
                time.sleep(OPEN_POLL_S)
                continue
            return ran
        said = False
        with warnings.catch_warnings():  # marked experimental in Optuna 5.0
            warnings.simplefilter("ignore", o.exceptions.ExperimentalWarning)
            o.storages.fail_stale_trials(study)  # a dead worker's trial: FAIL, then retried as WAITING
        fail_unstarted_trials(study, max(UNSTARTED_GRACE_S, 6 * storage.heartbeat))
        time.sleep(min(1.0, storage.heartbeat / 2))


@contextlib.contextmanager
def kept_open(storage: StorageSpec, name: str, lease: float = OPEN_LEASE_S):
    """While the block runs, study `name` tells workers that joined it (worker_loop(wait_open=True))
    to wait for more trials: a thread renews its OPEN_UNTIL lease every lease / 4 seconds on its own
    storage connection; the lease is cleared when the block ends, however it ends."""
    study = optuna().load_study(study_name=name, storage=storage.open())
    study.set_user_attr(OPEN_UNTIL, time.time() + lease)
    stop = threading.Event()

    def renew():
        while not stop.wait(lease / 4):
            try:
                study.set_user_attr(OPEN_UNTIL, time.time() + lease)
            except Exception:  # noqa: BLE001 - a storage hiccup: the lease lapses and the workers leave
                pass
    thread = threading.Thread(target=renew, name=f"lease-{name}", daemon=True)
    thread.start()
    try:
        yield study
    finally:
        stop.set()
        thread.join()
        study.set_user_attr(OPEN_UNTIL, 0.0)


def _worker_main(storage, name, objective, sampler_name, seed, pruner, wait_open=False):
    import torch
    torch.set_num_threads(1)
    try:
        worker_loop(storage, name, objective, sampler_name, seed, pruner, wait_open=wait_open)
    except UserError as e:
        import sys
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(2)


def _context():
    """Worker processes come from a fork server that imported torch, Optuna and the engine once and
    loaded the fast kernels (search/preload.py): a fresh interpreter each, nothing inherited from
    this process's threads or connections."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "optuna", "sqlalchemy", "backproplab.engine.train",
                                    "backproplab.search.hpo", "backproplab.search.preload"])
        return ctx
    return multiprocessing.get_context("spawn")


def run_workers(storage: StorageSpec, name: str, objective, jobs: int = 1, sampler: str = "tpe",
                seed: int | None = 0, pruner=None, wait_open=False) -> list:
    """jobs worker processes (each loading the study; jobs=1 runs in this process) ->
    their exit codes (0 each when all went well; -9 for a SIGKILLed one). A bar of the study's
    trials (done of all slots) on a terminal, read from the storage while the workers run.
    wait_open: the workers wait for more trials while the study's lease says its command may add
    some (kept_open; for `search worker`)."""
    from ..report.progress import bar
    with bar("search trials", None) as b:
        tick = _trials_ticker(storage, name, b)
        if jobs == 1:
            worker_loop(storage, name, objective, sampler, seed, pruner, after_trial=tick, wait_open=wait_open)
            return [0]
        return _run_processes(storage, name, objective, jobs, sampler, seed, pruner, tick, wait_open)


def _trials_ticker(storage: StorageSpec, name: str, b):
    """-> a function that sets bar b to the study's finished slots of all (no-op when bars are off)."""
    if not b.active:
        return lambda: None
    o = optuna()
    watch = o.load_study(study_name=name, storage=storage.open())
    S = o.trial.TrialState

    def tick():
        slots = slot_trials(watch)
        b.set_total(len(slots))
        b.update(sum(t.state in (S.COMPLETE, S.PRUNED) for t in slots.values()))
    tick()
    return tick


def _run_processes(storage, name, objective, jobs, sampler, seed, pruner, tick, wait_open=False) -> list:
    ctx = _context()
    codes = []
    for round_ in range(1 + RECOVERY_ROUNDS):
        procs = [ctx.Process(target=_worker_main, args=(storage, name, objective, sampler,
                                                         None if seed is None else seed + k + 1000 * round_, pruner,
                                                         wait_open),
                             name=f"search-worker-{k}") for k in range(jobs)]
        for p in procs:
            p.start()
        try:
            while any(p.is_alive() for p in procs):
                for p in procs:
                    p.join(timeout=0.5)
                tick()
        except KeyboardInterrupt:
            for p in procs:
                p.terminate()
            raise
        codes += [p.exitcode for p in procs]
        dead = {p.pid for p in procs if p.exitcode not in (0, 2)}
        if not dead or not storage.is_journal or not retry_dead_workers(storage, name, dead):
            break
    return codes


RECOVERY_ROUNDS = 3


def retry_dead_workers(storage: StorageSpec, name: str, pids: set) -> int:
    """On a journal (no heartbeat), the trials these dead local workers left RUNNING: marked FAIL
    and enqueued again with their parameters and slot, as a heartbeat storage's stale-trial
    callback does -> how many. Only for workers this process started and saw die."""
    o = optuna()
    S = o.trial.TrialState
    backend = storage.open()
    study = o.load_study(study_name=name, storage=backend)
    study_id = backend.get_study_id_from_name(name)
    retry = retry_callback()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(S.RUNNING,)):
        if t.user_attrs.get("pid") in pids:
            trial_id = backend.get_trial_id_from_study_id_trial_number(study_id, t.number)
            backend.set_trial_state_values(trial_id, state=S.FAIL)
            retry(study, backend.get_trial(trial_id))
            n += 1
    return n


def run_study(name: str, storage: StorageSpec, objective, n_trials: int | None = None, grid: list | None = None,
              jobs: int = 1, sampler: str = "tpe", seed: int | None = 0, pruner=None, spec: dict | None = None,
              direction: str = "minimize"):
    """Create (or continue) a study, enqueue n_trials slots or a grid's points, run `jobs` workers
    -> (study, worker exit codes). spec: JSON-able description stored on the study (its 'space'
    must match a study of that name that already exists)."""
    study = create_study(name, storage, spec or {"kind": "generic", "space": None}, direction)
    if grid is not None:
        enqueue_grid(study, grid)
    else:
        enqueue_slots(study, n_trials)
    codes = run_workers(storage, name, objective, jobs, sampler, seed, pruner)
    return study, codes


def slot_trials(study) -> dict:
    """slot -> its counted trial (COMPLETE or PRUNED; else the last attempt), surplus trials left out."""
    o = optuna()
    S = o.trial.TrialState
    best = {}
    for t in study.get_trials(deepcopy=False):
        if SLOT not in t.user_attrs or t.user_attrs.get(SURPLUS):
            continue
        k = t.user_attrs[SLOT]
        cur = best.get(k)
        done = t.state in (S.COMPLETE, S.PRUNED)
        if cur is None or done or cur.state not in (S.COMPLETE, S.PRUNED):
            if cur is not None and cur.state in (S.COMPLETE, S.PRUNED) and done:
                raise RuntimeError(f"slot {k} finished twice (trials {cur.number} and {t.number})")
            best[k] = t
    return dict(sorted(best.items()))
