"""`backproplab effects`: each training method alone on top of a base recipe, with error bars,
a significance test, time to the base's error, a Pareto plot and a composition table."""
import contextlib

from . import add_grid_args
from ..jsonout import emit_json, json_safe as _finite


def register(sub, add_common):
    e = sub.add_parser("effects", help="each method alone on a base recipe: error, time to the base's error, "
                                       "95%% CI and Welch test; Pareto plot; pairs vs the product of singles")
    add_common(e)
    e.add_argument("--base", default="modern", help="base preset (default modern)")
    e.add_argument("--seeds", type=int, default=8, help="seeds per method (default 8)")
    e.add_argument("--methods", help="comma-separated methods (default: every registered method the base can take)")
    e.add_argument("--pairs", help="pairs to compose, e.g. ema+label_smoothing,sam+swa "
                                   "(default: all pairs among the --top-pairs fastest singles)")
    e.add_argument("--top-pairs", type=int, default=3,
                   help="how many of the singles that reached the base's error, fastest first, are paired (default 3)")
    e.add_argument("--passes", type=int, help="passes for the base and every method (default: the base's)")
    e.add_argument("--eval-every", type=int,
                   help="evaluate the validation split every k passes (default: passes // 20, at least 1); "
                        "time to the base's error is resolved to k passes")
    e.add_argument("--val", type=int,
                   help="validation digits held out of the training set (default 1000; smoke 100): their curve "
                        "times the runs and chooses the pairs, the test split is evaluated once, at the end; "
                        "0 trains on every digit and times on the test curve (then name the pairs with --pairs)")
    e.add_argument("--multipliers", action="store_true",
                   help="also run the base and every method at 1/4 and 1/2 of the passes: each method's "
                        "effective-compute multiplier over the base, with a 95%% CI")
    e.add_argument("--jobs", type=int, default=1, help="runs trained at once in worker processes (default 1)")
    e.add_argument("--resume", action="store_true", help="skip finished runs, continue stopped ones")
    e.add_argument("--smoke", action="store_true",
                   help="test size: the base's smoke preset (500/200 digits, 2 passes), 2 methods, <= 2 seeds")
    add_grid_args(e, "run", "effects-<hash of the grid>", "default --out; the table is read back from it")




def _parse(args):
    from ..config import preset
    from ..errors import UserError
    from ..methods.registry import get_method
    if args.seeds < 1 or args.jobs < 1 or args.top_pairs < 0 or (args.passes is not None and args.passes < 1) \
            or (args.eval_every is not None and args.eval_every < 1) or (args.val is not None and args.val < 0):
        raise UserError("--seeds, --jobs, --passes and --eval-every must be >= 1, --top-pairs and --val >= 0")
    preset(args.base)  # an unknown base is named before anything trains
    methods = None
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods:
            raise UserError("--methods: give at least one method name")
        for m in methods:
            get_method(m)
    pairs = None
    if args.pairs is not None:
        pairs = []
        for item in filter(None, (p.strip() for p in args.pairs.split(","))):
            parts = item.split("+")
            if len(parts) != 2 or not all(parts):
                raise UserError(f"--pairs: {item!r} is not NAME+NAME")
            for m in parts:
                get_method(m)
            pairs.append((parts[0], parts[1]))
    if args.pairs is None and args.top_pairs == 0:
        pairs = []
    if args.val == 0 and pairs is None:  # the test curve may time runs, never choose them
        raise UserError("--val 0 leaves no validation split to choose pairs on: name them with --pairs a+b, "
                        "or --top-pairs 0")
    return methods, pairs


def _grid_runner(args, methods, pairs, seeds, passes, out, store, log):
    """--storage: the runs go to Optuna workers as the points of one grid study (search/grid.py)."""
    from ..search import grid
    from ..search import study as st
    if args.heartbeat <= 0:
        from ..errors import UserError
        raise UserError("--heartbeat must be > 0")
    storage = st.storage_spec(args.storage, out, args.heartbeat)
    space = {"base": args.base, "methods": methods, "pairs": pairs, "top_pairs": args.top_pairs, "seeds": seeds,
             "passes": passes, "eval_every": args.eval_every, "val": args.val, "multipliers": args.multipliers,
             "smoke": args.smoke}
    name = args.study or grid.study_name("effects", space)
    return grid.EffectsRunner(storage, name, space, args.jobs, out.resolve(), store, log)


def cmd_effects(args):
    methods, pairs = _parse(args)  # config and name errors before torch is busy
    seeds = min(args.seeds, 2) if args.smoke else args.seeds
    from ..engine.train import environment, prepare_out
    from ..experiments import effects as fx
    from ..store import add_run, check_store, is_url
    if args.storage and "://" in args.storage:
        from ..search import study as st
        st.storage_spec(args.storage, args.out).open()  # an unreachable server: one line, nothing local touched
    store = args.store or args.out
    check_store(store)
    out = prepare_out(args.out)
    if not is_url(store):
        store = prepare_out(store).resolve()
    passes = args.passes
    if args.multipliers and args.smoke and passes is None:
        passes = 4  # three distinct budgets: 1, 2 and 4 passes
    log = lambda s: print(s, flush=True)  # noqa: E731
    runner = _grid_runner(args, methods, pairs, seeds, passes, out, store, log) if args.storage else None
    # with --storage, workers that joined from other machines wait for the later stages (pairs and
    # budget runs, enqueued as the singles end) for as long as this command runs
    with runner.kept_open() if runner else contextlib.nullcontext():
        rows, comp, skipped, results, cfgs = fx.run_effects(args.base, methods, seeds, out, args.resume, args.jobs,
                                                            args.smoke, passes, pairs, args.top_pairs, log=log,
                                                            eval_every=args.eval_every, val=args.val,
                                                            multipliers=args.multipliers, runner=runner)
    env = environment()
    for key, res in results.items():
        fx.record_run(store, key, res, env)  # runs the workers recorded are found there, not written again
    bc = cfgs[fx.BASE_KEY]
    split = f"validation ({bc.data.val} digits held out)" if rows[0]["timing_split"] == "val" else "test"
    print(f"\nbase {bc.name}: {rows[0]['test_error']:.2f} +- {rows[0]['test_error_std']:.2f} % "
          f"(n={rows[0]['seeds']}); time to base = training seconds a seed until the seed-mean {split} error "
          f"first reaches the base's {rows[0]['base_error']:.2f} % (evaluated every {bc.train.eval_every} passes)")
    print(fx.format_table(rows))
    if args.multipliers:
        print("compute x: passes the base needs to reach the method's final test error / the method's passes "
              "(base curve: power law with a floor through 1/4, 1/2, 1 of the passes; * extrapolated beyond "
              "the base's passes)")
    for k, why in skipped.items():
        print(f"skipped {k}: {why}")
    print()
    print(fx.format_composition(comp))
    folder = out / "effects"
    folder.mkdir(exist_ok=True)
    name = cfgs[fx.BASE_KEY].name
    png = fx.pareto_plot(rows, folder / f"pareto-{name}.png",
                         f"effects on {name}: {seeds} seeds, {cfgs[fx.BASE_KEY].train.passes} passes")
    if png:
        print(f"wrote {png}")
    summary = {"base": name, "seeds": seeds, "passes": cfgs[fx.BASE_KEY].train.passes,
               "eval_every": cfgs[fx.BASE_KEY].train.eval_every, "val": cfgs[fx.BASE_KEY].data.val,
               "timing_split": rows[0]["timing_split"], "multipliers": args.multipliers, "rows": rows,
               "composition": comp, "skipped": skipped, "plot": str(png) if png else None, "smoke": args.smoke}
    status = "finished" if all(r["status"] == "finished" for r in rows) else "partial"
    summary["run_id"] = add_run(store, "effects", f"effects:{name}", status, cfgs[fx.BASE_KEY].to_dict(),
                                _finite(summary), [], env)
    if args.json:
        emit_json(summary)
    return 0 if status == "finished" else 3


COMMANDS = {"effects": cmd_effects}
