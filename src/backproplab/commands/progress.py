"""`backproplab progress`: every recipe's compute and data curves, effective-compute and
effective-data multipliers with 95% intervals, and the algorithm / data / compute split of
the 1989 -> 2022 drop (experiments/progress.py says how each is measured)."""
import os

from ..jsonout import emit_json, json_safe


def register(sub, add_common):
    p = sub.add_parser("progress", help="compute curves per recipe, effective-compute and -data multipliers "
                                        "with CIs, and the algorithm/data/compute decomposition")
    add_common(p)
    p.add_argument("--recipes", help="comma-separated presets (default rung1-5, speedrun, rung7)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per point (default 4)")
    p.add_argument("--budgets", help="fractions of each recipe's passes (default 1/16,1/8,1/4,1/2,1)")
    p.add_argument("--sizes", help="fractions of the training set for the data curves (default 1/4,1/2,1)")
    p.add_argument("--decompose", default="rung1,rung5",
                   help="the two recipes of the 2x2x2 decomposition (default rung1,rung5; 'none' to skip)")
    p.add_argument("--boot", type=int, default=300, help="bootstrap refits for the intervals (default 300)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs trained at once")
    p.add_argument("--resume", action="store_true", help="reuse finished runs, continue stopped ones")
    p.add_argument("--smoke", action="store_true",
                   help="test size: 300 training and 200 test digits, at most 8 passes a recipe, 2 seeds")


def cmd_progress(args):
    from ..errors import UserError
    from ..experiments import progress as pg
    if args.seeds < 1 or args.jobs < 1 or args.boot < 20:
        raise UserError("--seeds and --jobs must be >= 1, --boot >= 20")
    recipes = pg.parse_recipes(args.recipes)
    budgets, sizes = pg.parse_fractions(args.budgets, "budgets"), pg.parse_fractions(args.sizes, "sizes")
    dec = None
    if args.decompose and args.decompose.strip().lower() != "none":
        dec = tuple(t.strip() for t in args.decompose.split(",") if t.strip())
        if len(dec) != 2 or dec[0] == dec[1]:
            raise UserError(f"--decompose {args.decompose}: name two different recipes, e.g. rung1,rung5")
        missing = [r for r in dec if r not in recipes]
        if missing:
            raise UserError(f"--decompose: {', '.join(missing)} is not among --recipes")
    seeds = min(args.seeds, 2) if args.smoke else args.seeds
    pg.plan(recipes, seeds, budgets, sizes, dec, args.smoke)  # every config error before anything trains
    from ..engine.train import environment, prepare_out
    from ..store import add_run, check_store, list_runs
    check_store(args.out)
    out = prepare_out(args.out)
    plan_, results, summary = pg.run_progress(recipes, seeds, budgets, sizes, dec, out, args.resume, args.jobs,
                                              args.smoke, args.boot, log=lambda s: print(s, flush=True))
    env = environment()
    known = {(r["kind"], r["summary"].get("config_digest")) for r in list_runs(out)} if args.resume else set()
    for key, res in results.items():
        s = res.summary()
        if ("progress-run", s["config_digest"]) not in known:
            s.update({"recipe": key[0], "n_train": key[1], "passes": key[2]})
            add_run(out, "progress-run", plan_["configs"][key].name, res.status, res.config, s, res.history, env)
    print()
    print(pg.format_table(summary))
    pngs = pg.plots(summary, out / "progress")
    for p in pngs:
        print(f"wrote {p}")
    summary.update({"recipes": recipes, "seeds": seeds, "smoke": args.smoke, "plots": [str(p) for p in pngs],
                    "budgets": [str(b) for b in (budgets or pg.BUDGETS)], "sizes": [str(s) for s in (sizes or pg.SIZES)]})
    summary["run_id"] = add_run(out, "progress", "progress:" + ",".join(recipes), "finished", {}, json_safe(summary),
                                [], env)
    if args.json:
        emit_json(summary)
    return 0


COMMANDS = {"progress": cmd_progress}
