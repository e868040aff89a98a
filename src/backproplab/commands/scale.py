"""`backproplab scale run|fit`: scaling studies and their fits (issue 5).

  scale run --family convnet|vit --data mnist10k|PATH [--budget 30m] [--out DIR] [--smoke]
  scale fit RUNS.db [--out DIR]        fits, tables and PNG plots from a study's store
  scale fit --synthetic                the fitter on runs made from known constants
  scale fit --csv FILE                 anyone's runs: columns N, loss, D or C (family, epochs, U, lr)
"""
from . import add_grid_args
import os
import sys
from pathlib import Path

from ..errors import UserError
from ..jsonout import emit_json


def register(sub, add_common):
    sc = sub.add_parser("scale", help="scaling laws: run a study (sizes x data x epochs x learning rates), fit it")
    ss = sc.add_subparsers(dest="scale_cmd")
    r = ss.add_parser("run", help="run a scaling study; finished cells are skipped on a rerun")
    add_common(r)
    r.add_argument("--family", default="convnet", help="convnet (default) or vit")
    r.add_argument("--data", default="mnist10k", help="mnist10k (embedded, default) or a folder of IDX files")
    r.add_argument("--budget", help="time budget, e.g. 30m, 90s, 1.5h: the grid is trimmed (costliest cells "
                                    "first) to fit the projected time")
    r.add_argument("--smoke", action="store_true", help="test size: 3 sizes x 2 training sets x 2 budgets x 2 rates")
    r.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="cells trained at once, one core each")
    r.add_argument("--sizes", help="comma-separated model sizes (default 1-6)")
    r.add_argument("--n-train", help="comma-separated training-set sizes (default n/4, n/2, n of the training "
                                        "set left after the validation carve-out: 1573,3146,6291 on mnist10k)")
    r.add_argument("--epochs", help="comma-separated epoch budgets, fractions allowed (default 0.25,0.5,1,2,4,8)")
    r.add_argument("--lrs", help="comma-separated base learning rates (default: the family's grid)")
    r.add_argument("--n-val", type=int, help="validation examples: the last n of the training set, carved out "
                                              "as data.val does (default 1000; --smoke 300); the cells train on "
                                              "the rest; the test set is only reported")
    r.add_argument("--batch", type=int, default=32, help="minibatch size (default 32)")
    r.add_argument("--seeds", help="comma-separated seeds every cell trains (default 0,1,2); a seed sets a "
                                   "run's init, training subset and epoch order; a cell's loss is the mean over "
                                   "its seeds at the chosen rate")
    r.add_argument("--seed", type=int, help="one seed only (the same as --seeds SEED)")
    r.add_argument("--rate-seeds", type=int, default=1,
                   help="sweep the learning rates on the first K seeds (default 1); the other seeds train at the "
                        "chosen rate only. K = the number of seeds sweeps every rate on every seed")
    r.add_argument("--plan", action="store_true", help="print the grid and projected time, run nothing")
    add_grid_args(r, "cell", "scale-<the study's digest>", "default --out, which keeps the cells' scratch files either way")
    r.add_argument("methods", nargs="*", metavar="+method=NAME[:k=v,...]",
                   help="registered methods every cell adds to its recipe (their own cells, keys and records)")
    f = ss.add_parser("fit", help="fit scaling laws to a study's runs (frontier, Chinchilla, IsoFLOP, lr)")
    add_common(f)
    f.set_defaults(out=None)
    f.add_argument("db", nargs="?", help="the study's results store: DIR/runs.db, DIR, or postgresql+psycopg://USER@HOST:PORT/DB")
    f.add_argument("--synthetic", action="store_true", help="check the fitter on runs made from known constants")
    f.add_argument("--csv", metavar="FILE", help="fit anyone's runs from a CSV file: a header row, columns N, loss "
                                                 "and D or C (C = 6 N D when one is missing); optional family, "
                                                 "epochs, U, lr. Plots and the report go to --out (default: "
                                                 "FILE's folder/scaling)")
    f.add_argument("--compare", metavar="A,B",
                   help="two recipes of the store (base, or their +method= texts, e.g. base,sam:rho=0.05): each "
                        "fitted apart; exponents, constants and their differences with 95%% CIs")
    f.add_argument("--recipe", help="fit only this recipe's runs (a store holding several is refused without it)")
    f.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals (default 1000)")
    f.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    f.add_argument("--by-seed", action="store_true",
                   help="the extrapolation check with seeds as the unit: every form fitted on each seed alone and "
                        "on every resample of the seeds (a bootstrap over seeds), mean held-out error with intervals")
    f.add_argument("--noise", type=float, help="--synthetic: sigma of the log-normal loss noise (default 0.01)")


def _emit_json(obj):
    emit_json(obj)


def cmd_scale(args):
    if args.scale_cmd == "run":
        return _run(args)
    if args.scale_cmd == "fit":
        return _fit(args)
    raise UserError("backproplab scale: choose run or fit (see backproplab scale --help)")


def _run(args):
    from ..scaling.study import make_study, parse_budget, run_study
    budget = parse_budget(args.budget)
    if args.jobs < 1 or args.batch < 1 or (args.n_val is not None and args.n_val < 1):
        raise UserError("--jobs, --batch and --n-val must be >= 1")
    if args.seed is not None and args.seeds is not None:
        raise UserError("give --seeds or --seed, not both")
    if args.seed is not None and args.seed < 0:
        raise UserError("--seed must be >= 0")
    seeds = [args.seed] if args.seed is not None else _seeds(args.seeds)
    if args.data != "mnist10k" and not Path(args.data).expanduser().exists():
        raise UserError(f"--data {args.data}: no such file or folder (use mnist10k or a folder of IDX files)")
    if args.heartbeat <= 0:
        raise UserError("--heartbeat must be > 0")
    from ..search import study as st
    storage = st.storage_spec(args.storage, args.out, args.heartbeat) if args.storage else None
    if storage is not None and not storage.is_journal:
        storage.open()                          # an unreachable server: one line, nothing local touched
    from ..store import check_store
    store = args.store or args.out
    check_store(store)
    from ..scaling.cells import DEFAULT_N_VAL, data_fingerprint, study_data
    from ..scaling.study import SMOKE
    n_val = args.n_val if args.n_val is not None else SMOKE["n_val"] if args.smoke else DEFAULT_N_VAL
    data = study_data(args.data, n_val)
    fingerprint = data_fingerprint(data)
    study = make_study(args.family, args.data, smoke=args.smoke, sizes=args.sizes, n_train=args.n_train,
                       epochs=args.epochs, lrs=args.lrs, n_avail=len(data[1]), n_val=n_val, batch=args.batch,
                       seeds=seeds, data_fingerprint=fingerprint, methods=_methods(args.methods),
                       rate_seeds=args.rate_seeds)
    runner = None
    if storage is not None and not args.plan:
        from ..search.grid import ScaleRunner
        runner = ScaleRunner(storage, args.study or f"scale-{study.spec['digest']}",
                             {"digest": study.spec["digest"]}, args.jobs, Path(args.out).resolve(),
                             store if "://" in str(store) else Path(store).resolve(), fingerprint,
                             log=(lambda line: print(line, file=sys.stderr)) if args.json else print)
    quiet = args.json
    from ..report.progress import Bar
    cells = []                                     # the bar of cells, opened when their number is known

    def on_cell(done, total):
        if not cells:
            cells.append(Bar("scale cells", total))
        cells[0].update(done)

    try:
        summary = run_study(study, args.out, jobs=args.jobs, budget=budget, plan_only=args.plan, data=data,
                            log=(lambda line: print(line, file=sys.stderr)) if quiet else print, progress=on_cell,
                            store=store, runner=runner)
    finally:
        for b in cells:
            b.close()
    if not args.plan and summary["ran"] + summary["already_done"]:
        print(f"next: backproplab scale fit {summary['store']}", file=sys.stderr if quiet else sys.stdout)
    if args.json:
        _emit_json(summary)
    return 0 if summary.get("diverged_cells", 0) == 0 else 3


def _seeds(text):
    from ..scaling.study import DEFAULT_SEEDS
    if text is None:
        return list(DEFAULT_SEEDS)
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected comma-separated integers") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: give distinct seeds >= 0")
    return seeds


def _methods(items):
    bad = [i for i in items if not i.startswith("+method=")]
    if bad:
        raise UserError(f"scale run: {bad[0]!r} is not +method=NAME[:key=value,...]")
    return items


def _fit(args):
    from ..scaling import check_synthetic
    if args.n_boot < 0:
        raise UserError("--n-boot must be >= 0")
    from ..scaling.fitcmd import fit_csv, fit_store, fit_text, synthetic_text
    given = [name for name, v in (("RUNS.db", args.db), ("--synthetic", args.synthetic), ("--csv", args.csv)) if v]
    if len(given) > 1:
        raise UserError(f"scale fit: give one of RUNS.db, --synthetic and --csv, not {' and '.join(given)}")
    if args.by_seed and (not args.db or args.compare):
        raise UserError("scale fit: --by-seed reads a study's results store (RUNS.db), without --compare")
    if (args.compare or args.recipe) and not args.db:
        raise UserError("scale fit: --compare and --recipe read a study's results store (RUNS.db), "
                        "not --csv or --synthetic")
    if args.csv:
        rep = fit_csv(args.csv, args.out, n_boot=args.n_boot, seed=args.seed)
        print(fit_text(rep))
        if args.json:
            _emit_json(rep)
        return 0
    if args.synthetic:
        kw = {} if args.noise is None else {"noise": args.noise}
        if args.noise is not None and not args.noise >= 0:
            raise UserError("--noise must be >= 0")
        res = check_synthetic(n_boot=args.n_boot, seed=args.seed, **kw)
        print(synthetic_text(res))
        if args.json:
            _emit_json(res)
        return 0
    if not args.db:
        raise UserError("scale fit: give the study's results store (RUNS.db), --csv FILE or --synthetic")
    if args.compare:
        from ..scaling.compare import compare_store, compare_text, parse_compare
        labels = parse_compare(args.compare)
        rep = compare_store(args.db, labels, n_boot=args.n_boot, seed=args.seed)
        print(compare_text(rep))
        if args.json:
            _emit_json(rep)
        return 0
    rep = fit_store(args.db, args.out, n_boot=args.n_boot, seed=args.seed, recipe=args.recipe, by_seed=args.by_seed)
    print(fit_text(rep))
    if args.json:
        _emit_json(rep)
    return 0


COMMANDS = {"scale": cmd_scale}
