"""`backproplab search`: hyperparameter search on Optuna (TPE, random, grid, CMA-ES; ASHA or
Hyperband pruning on per-pass validation error), journal or PostgreSQL storage, worker processes
here and `backproplab search worker` on other machines; the best trial re-trained on the whole
training set with n seeds and reported on the test set once."""
import os
import sys

from ..errors import UserError
from ..jsonout import emit_json, json_safe


def register(sub, add_common):
    s = sub.add_parser("search", help="hyperparameter search on Optuna: trials judged on a validation split, "
                                      "the best re-trained with n seeds and tested once; "
                                      "`search worker --storage URL --study NAME` joins a study")
    add_common(s)
    s.add_argument("preset", nargs="?", help="config preset (default smoke with --smoke); 'worker' joins a study")
    s.add_argument("space", nargs="*", metavar="KEY=SPEC",
                   help="optim.lr=log:1e-4:1e-1, optim.lr=1e-3:1e-2, train.batch=int:16:64, "
                        "model.act=choice:tanh,relu, +method=label_smoothing:eps=0:0.3, "
                        "methods=choice:sam,ema,none, train.passes=3 (fixed)")
    s.add_argument("--space", dest="space_file", help="a JSON, TOML or YAML file mapping KEY -> SPEC")
    s.add_argument("--sampler", default="tpe", help="tpe (default), random, grid or cmaes; "
                   "tpe:startup=N,multivariate=0|1 sets TPE's random start-up trials (10) and whether it models "
                   "the parameters jointly (Optuna's default for one objective: yes)")
    s.add_argument("--grid-points", type=int, default=3,
                   help="grid sampler: values per float range (log-spaced for log:), default 3")
    s.add_argument("--trials", type=int, help="trials (default 20; 4 with --smoke; grid: every point)")
    s.add_argument("--jobs", type=int, help="worker processes on this machine (default 1; 2 with --smoke)")
    s.add_argument("--pruner", default="none", help="none (default), asha (successive halving) or hyperband; asha:min=PASSES,factor=K sets "
                   "the passes before the first rung (default 1) and the reduction factor (default 3)")
    s.add_argument("--storage", help="study storage: a journal file (default OUT/search.journal) or "
                                     "postgresql+psycopg://USER@HOST:PORT/DB for workers on many machines")
    s.add_argument("--study", help="study name (default PRESET-<hash of the space>)")
    s.add_argument("--store", help="results store: a folder or postgresql+psycopg:// URL (default --out)")
    s.add_argument("--seeds", type=int, help="seeds for re-training the best trial (default 3; 2 with --smoke)")
    s.add_argument("--sampler-seed", type=int, default=0, help="seed of the sampler (worker k uses seed + k)")
    s.add_argument("--val", type=int, help="validation digits carved from the training set "
                                           "(default: the preset's data.val, else 1/6 of it, at most 1000)")
    s.add_argument("--heartbeat", type=float, default=10.0,
                   help="seconds between a worker's heartbeats on a database storage; a trial silent for 3x "
                        "this is retried by another worker (default 10)")
    s.add_argument("--no-retrain", action="store_true", help="stop after the search (no test-set run)")
    s.add_argument("--smoke", action="store_true",
                   help="test size: 400 training digits (100 of them validation), 200 test, 2 passes, 4 trials, "
                        "2 workers, 2 seeds for the best")


def _check_counts(args):
    for name in ("trials", "jobs", "seeds", "grid_points", "val"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.grid_points < 2:
        raise UserError("--grid-points must be >= 2")
    if args.heartbeat <= 0:
        raise UserError("--heartbeat must be > 0")


def cmd_search(args):
    if args.preset == "worker":
        return cmd_worker(args)
    _check_counts(args)
    from ..search import hpo
    from ..search import study as st
    sampler, _ = st.parse_sampler(args.sampler)   # a bad name or option: one line before anything else
    st.optuna()  # the one-line install hint before anything else
    preset = args.preset or ("smoke" if args.smoke else None)
    if preset is None:
        raise UserError("search: name a preset (e.g. backproplab search smoke optim.lr=log:1e-3:0.3)")
    items = hpo.gather_items(args.space, args.space_file)
    if not items:
        if not args.smoke:
            raise UserError("search: give a search space (KEY=SPEC items or --space FILE)")
        items = list(hpo.SMOKE_SPACE)
    overrides = list(hpo.SMOKE) if args.smoke else []
    base = hpo.base_config(preset, overrides)
    val = args.val or (100 if args.smoke else hpo.default_val(base))
    overrides.append(f"data.val={val}")
    base = hpo.base_config(preset, overrides)  # data.val checked against the training set's size
    from ..search.space import parse_space
    space = parse_space(items, base)           # every key, method and range before any trial
    trials = args.trials or (4 if args.smoke else 20)
    jobs = args.jobs or (2 if args.smoke else 1)
    grid = None
    if sampler == "grid":
        if not space.dims:
            raise UserError("--sampler grid: the space has nothing to vary")
        grid = hpo.grid_points(space, args.grid_points)
        trials = len(grid)
    if sampler == "cmaes":
        st.make_sampler("cmaes", 0)  # the missing-package hint now, not in every worker
    pruner = st.make_pruner(args.pruner, hpo.max_passes(base, space))   # bad options refused before anything is made
    storage = st.storage_spec(args.storage, args.out, args.heartbeat)
    if not storage.is_journal:
        storage.open()                          # an unreachable server: one line, nothing local touched
    store = args.store or args.out
    from ..store import check_store, is_url
    check_store(store)
    from ..engine.train import prepare_out
    out = prepare_out(args.out)
    if not is_url(store):
        store = str(prepare_out(store).resolve())
    spec = hpo.study_spec(preset, items, overrides, args.sampler, args.pruner, hpo.max_passes(base, space),
                          out.resolve(), store, trials)
    name = args.study or hpo.default_study_name(spec)
    spec["study"] = name
    study = st.create_study(name, storage, spec)
    added = st.enqueue_grid(study, grid) if grid is not None else st.enqueue_slots(study, trials)
    print(f"study {name} in {storage.describe()}: {trials} trials ({added} new), {len(space.dims)} dimensions, "
          f"sampler {args.sampler}, pruner {args.pruner}, {jobs} worker{'s' if jobs > 1 else ''}, "
          f"validation {val} digits of the training set", flush=True)
    objective = hpo.TrialObjective(preset, items, overrides, str(out.resolve()), store, name)
    codes = st.run_workers(storage, name, objective, jobs, args.sampler, args.sampler_seed, pruner)
    return _finish(args, study, spec, storage, codes, out, store)


def _finish(args, study, spec, storage, codes, out, store):
    from ..search import hpo
    res = hpo.summarize(study, spec)
    _print_trials(res)
    dead = [c for c in codes if c not in (0, None)]
    if dead:
        print(f"{len(dead)} worker(s) ended abnormally (exit codes {dead})", file=sys.stderr)
    if res["running"] and storage.is_journal:
        print(f"{res['running']} trial(s) still RUNNING: a worker elsewhere is running them, or died where no "
              f"process saw it (a journal has no heartbeat; a database --storage retries such trials)",
              file=sys.stderr)
    summary = {"study": spec["study"], "storage": storage.describe(), **{k: v for k, v in res.items()},
               "workers": len(codes), "worker_exit_codes": codes}
    if res["best"] is None:
        if args.json:
            emit_json(json_safe(summary))
        raise UserError(f"study {spec['study']}: no trial finished ({res['failed']} failed, {res['pruned']} pruned)")
    b = res["best"]
    print(f"best: trial {b['trial']} validation error {b['value']:.2f}% with "
          + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["params"].items()))
    if not args.no_retrain:
        seeds = args.seeds or (2 if args.smoke else 3)
        print(f"re-training the best on the whole training set with {seeds} seeds", flush=True)
        final = hpo.retrain_best(spec, b["params"], seeds, out, store)
        std = final.get("test_error_std", 0.0)
        print(f"test error {final['test_error']:.2f} +- {std:.2f} % (n={seeds} seeds; stored as run "
              f"{final['run_id']})")
        summary["final"] = final
    if args.json:
        emit_json(json_safe(summary))
    return 0


def _print_trials(res):
    rows = sorted(res["trials"], key=lambda r: (r["value"] is None, r["value"] if r["value"] is not None else 0))
    print(f"{res['complete']} complete, {res['pruned']} pruned, {res['failed']} failed; "
          f"{res['attempts']} attempts; {res['passes_trained']} passes trained")
    for r in rows[:10]:
        val = f"{r['value']:6.2f}%" if r["value"] is not None else "     - "
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        print(f"  trial {r['trial']:4d}  {r['state']:8s}  val {val}  passes {r['passes']:3d}  {params}")


def cmd_worker(args):
    """Join an existing study from this (or another) machine: run its waiting trials until none is left."""
    if not args.storage or not args.study:
        raise UserError("search worker: needs --storage URL and --study NAME")
    if args.space or args.space_file:
        raise UserError("search worker: the study carries its search space; give no KEY=SPEC items")
    _check_counts(args)
    from ..search import hpo
    from ..search import study as st
    from ..search import grid
    storage = st.storage_spec(args.storage, args.out, args.heartbeat)
    study, spec = st.load_study(args.study, storage)
    if spec.get("kind") not in ("hpo", *grid.KINDS):
        raise UserError(f"study {args.study!r} is neither a hyperparameter search nor a grid of effects or scale run")
    from ..engine.train import prepare_out
    from ..store import check_store, is_url
    store = spec["store"] if is_url(spec["store"]) else (args.store or args.out)
    check_store(store)
    out = prepare_out(args.out)
    if not is_url(store):
        store = str(prepare_out(store).resolve())
    if spec["kind"] in grid.KINDS:
        return _grid_worker(args, storage, study, spec, out, store)
    objective = hpo.TrialObjective(spec["preset"], spec["items"], spec["overrides"], str(out.resolve()), store,
                                   args.study)
    pruner = st.make_pruner(spec["pruner"], spec["passes"])
    seed = None if args.sampler_seed == 0 else args.sampler_seed  # other machines: their own random streams
    codes = st.run_workers(storage, args.study, objective, args.jobs or 1, spec["sampler"], seed, pruner)
    res = hpo.summarize(study, spec)
    print(f"worker {os.uname().nodename}: study {args.study}: {res['complete']} complete, {res['pruned']} pruned, "
          f"{res['waiting']} waiting, {res['running']} running")
    if args.json:
        emit_json(json_safe({"study": args.study, "worker_exit_codes": codes,
                             **{k: res[k] for k in ("complete", "pruned", "failed", "waiting", "running")}}))
    return 0 if all(c == 0 for c in codes) else 1


def _grid_worker(args, storage, study, spec, out, store):
    """A worker of an effects or scale-run grid: runs its waiting points into the results store."""
    from ..search import grid
    from ..search import study as st
    objective = grid.GridObjective(spec["kind"], str(out.resolve()), store)
    codes = st.run_workers(storage, args.study, objective, args.jobs or 1, "random", None, None, wait_open=True)
    o = st.optuna()
    S = o.trial.TrialState
    slots = st.slot_trials(study)
    counts = {k: sum(t.state == s for t in slots.values()) for k, s in
              (("complete", S.COMPLETE), ("failed", S.FAIL), ("waiting", S.WAITING), ("running", S.RUNNING))}
    print(f"worker {os.uname().nodename}: {spec['kind']} study {args.study}: {counts['complete']} of {len(slots)} "
          f"points complete, {counts['failed']} failed, {counts['waiting']} waiting, {counts['running']} running")
    if args.json:
        emit_json(json_safe({"study": args.study, "kind": spec["kind"], "points": len(slots),
                             "worker_exit_codes": codes, **counts}))
    return 0 if all(c == 0 for c in codes) else 1


COMMANDS = {"search": cmd_search}
