"""`backproplab speedrun` (the 1989 net to the rung-5 error in seconds) and `backproplab rezero`
(deep residual stacks with and without normalization)."""
import math

from ..errors import UserError
from ..jsonout import emit_json as _emit_json


def register(sub, add_common):
    s = sub.add_parser("speedrun", help="the 1989 net to rung 5's test error in seconds on one core")
    add_common(s)
    s.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 (default 8)")
    s.add_argument("--population", action="store_true",
                   help="train all seeds at once as one population instead of one after another")
    s.add_argument("--epochs", type=int, help="passes over the training set (train.passes)")
    s.add_argument("--batch", type=int, help="examples per step (train.batch)")
    s.add_argument("--lr", type=float, help="peak learning rate (optim.lr)")
    s.add_argument("--tta", type=int, help="test-time shifts averaged: 1 (none), 5 or 9 (+method=tta:n=N)")
    s.add_argument("--reference-steps", type=int, default=300,
                   help="steps of the per-example eager rung-5 reference to time (default 300; 0 skips it)")
    s.add_argument("--target", type=float, help="test error to beat in percent (default: rung 5's measured mean)")
    s.add_argument("--smoke", action="store_true",
                   help="test size: 1000 training and 500 test digits, 5 epochs of batch 32")
    s.add_argument("items", nargs="*", metavar="+method=NAME[:k=v,...] | key=value",
                   help="methods and config overrides on the speedrun preset, e.g. +method=sam data.val=1000")
    r = sub.add_parser("rezero", help="ReZero vs none/BatchNorm/LayerNorm in deep residual MLP and conv stacks")
    add_common(r)
    r.add_argument("--depths", default="8,32,64,128",
                   help="residual layers, comma-separated, each 1..256 (default 8,32,64,128)")
    r.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    r.add_argument("--budget-steps", type=int, help="training steps per run (default 300 mlp, 150 conv)")
    r.add_argument("--stacks", default="mlp,conv", help="mlp, conv or both (default)")
    r.add_argument("--norms", default="none,batch,layer_pre,layer_post,rezero", help="block variants to compare")
    r.add_argument("--smoke", action="store_true", help="test size: depths 2,4, 12 steps, 2 seeds, 600 digits")




def _fmt(m, s):
    return f"{m:.2f} +- {s:.2f} %"


def speedrun_config(args):
    """The speedrun preset with the command's flags and items applied, validated."""
    from ..config import apply_overrides, preset
    items = []
    if args.smoke:
        items += ["data.n_train=1000", "data.n_test=500", "train.passes=5", "train.batch=32"]
    for flag, key in (("epochs", "train.passes"), ("batch", "train.batch"), ("lr", "optim.lr")):
        if getattr(args, flag) is not None:
            items.append(f"{key}={getattr(args, flag)}")
    if args.tta is not None:
        items.append(f"+method=tta:n={args.tta}")
    cfg = apply_overrides(preset("speedrun"), items + list(args.items))
    if cfg.train.engine != "population":
        raise UserError(f"the speedrun trains on the population engine, not train.engine={cfg.train.engine}")
    cfg.train.eval_every = cfg.train.passes  # evaluated once, at the end
    return cfg


def cmd_speedrun(args):
    if args.seeds < 1 or args.reference_steps < 0 or (args.target is not None and not 0 < args.target <= 100):
        raise UserError("--seeds must be >= 1, --reference-steps >= 0 and --target in (0, 100]")
    cfg = speedrun_config(args)
    ref_steps = min(args.reference_steps, 20) if args.smoke else args.reference_steps
    import torch
    torch.set_num_threads(1)
    from ..data import load_dataset
    from ..engine.train import environment, prepare_out
    from ..experiments.speedrun import reference_step_seconds, rung5_target, run_speedrun
    from ..store import add_run
    out = prepare_out(args.out)
    target, source = rung5_target(out) if args.target is None else (args.target, "--target")
    d = cfg.data
    data = load_dataset(d.source, d.n_train, d.n_test)
    methods = ", ".join(f"{m.name}({', '.join(f'{k}={v}' for k, v in m.options.items())})" for m in cfg.methods)
    print(f"recipe: the speedrun preset, {cfg.train.passes} passes of batch {cfg.train.batch}, {cfg.optim.name} "
          f"lr {cfg.optim.lr:g} -> {cfg.optim.lr_end}, methods {methods}; "
          f"{'one population of ' + str(args.seeds) + ' seeds' if args.population else 'each seed alone'}, "
          f"1 thread", flush=True)
    res = run_speedrun(cfg, data, list(range(args.seeds)), population=args.population)
    ref = reference_step_seconds(data, ref_steps) if ref_steps else None
    fast = reference_step_seconds(data, 10 * ref_steps, "fast") if ref_steps and _fast_engine_ok() else None
    per_seed = res["train_seconds_per_seed"] if args.population else res["train_seconds_max_seed"]
    res.update({"target": target, "target_source": source,
                "meets_target": res["test_error"] <= target, "smoke": args.smoke, "reference": ref,
                "speedup": ref["full_seconds"] / per_seed if ref else None, "reference_fast": fast,
                "speedup_vs_fast": fast["full_seconds"] / per_seed if fast else None,
                "passes": cfg.train.passes, "seconds": res["train_seconds_total"]})  # fields `backproplab runs` lists
    n = res["seeds"]
    plain = ("" if res["test_error_no_tta"] is None else
             f"; without test-time shifts {_fmt(res['test_error_no_tta'], res['test_error_no_tta_std'] or 0.0)}")
    print(f"test error {_fmt(res['test_error'], res['test_error_std'])} (mean +- std, n={n}){plain}")
    if "val_error" in res:
        print(f"validation error {_fmt(res['val_error'], res['val_error_std'])} (data.val={cfg.data.val})")
    print(f"target {target:.2f} % ({res['target_source']}): {'met' if res['meets_target'] else 'NOT met'}")
    if args.population:
        print(f"training: {res['train_seconds_total']:.2f} s wall for all {n} seeds in one population "
              f"({res['train_seconds_per_seed']:.2f} s a seed), cpu {res['train_cpu_seconds_total']:.2f} s; "
              f"gradient path {res['path']}")
    else:
        print(f"training: {res['train_seconds_per_seed']:.2f} s wall a seed on average, slowest seed "
              f"{res['train_seconds_max_seed']:.2f} s, total {res['train_seconds_total']:.2f} s; "
              f"gradient path {res['path']}")
    print(f"evaluation (not in the training time): {res['eval_seconds_total']:.2f} s; "
          f"{res['steps']} steps, {res['gflop_per_seed']:.0f} GFLOP a seed")
    if ref:
        print(f"per-example reference (rung 5 on the eager engine): {ref['step_seconds'] * 1e3:.2f} ms a step over "
              f"{ref['steps_timed']} timed steps x {ref['full_steps']:,} steps = {ref['full_seconds'] / 60:.1f} min; "
              f"speed-up {res['speedup']:.0f}x (per seed, {'population' if args.population else 'slowest seed'})")
    if fast:
        print(f"the project's fast per-example engine (numba) on the same rung-5 recipe: "
              f"{fast['step_seconds'] * 1e6:.1f} us a step = {fast['full_seconds']:.1f} s; "
              f"speed-up {res['speedup_vs_fast']:.1f}x")
    status = "finished" if res["meets_target"] or args.smoke else "missed"
    res["run_id"] = add_run(out, "speedrun", "speedrun-smoke" if args.smoke else "speedrun", status,
                            cfg.to_dict(), {k: v for k, v in res.items() if k not in ("per_seed", "config")},
                            res["per_seed"], environment())
    if args.json:
        _emit_json(res)
    return 0


def _fast_engine_ok() -> bool:
    try:  # the numba kernels need AVX-512; without it the fast comparison is left out
        from ..engine.fast import _check_cpu
        _check_cpu()
        return True
    except (RuntimeError, ImportError):
        return False


def cmd_rezero(args):
    from ..experiments import rezero as rz
    stacks = rz.parse_names(args.stacks, rz.KINDS, "stacks")
    norms = rz.parse_names(args.norms, rz.NORMS, "norms")
    depths = rz.parse_ints(args.depths, "depths")
    if args.seeds < 1 or (args.budget_steps is not None and args.budget_steps < rz.WINDOW):
        raise UserError(f"--seeds must be >= 1 and --budget-steps >= {rz.WINDOW}")
    steps, n_train, n_test, seeds = args.budget_steps, None, None, args.seeds
    if args.smoke:
        depths, steps, n_train, n_test, seeds = [2, 4], steps or 12, 600, 200, min(seeds, 2)
    import torch
    torch.set_num_threads(1)
    from ..data import load_dataset
    from ..engine.train import environment, prepare_out
    from ..store import add_run
    out = prepare_out(args.out)
    data = load_dataset("mnist10k", n_train, n_test)
    runs = rz.run_study(data, stacks, depths, norms, seeds, steps,
                        log=(lambda s: print(s, flush=True)) if not args.json else (lambda s: None))
    rows = rz.summarize(runs)
    claims = rz.claims(rows)
    print(rz.format_table(rows))
    for c in claims:
        others = ", ".join(f"{k} {v:.0f}" for k, v in c["others_steps"].items()) or "no other variant reached it"
        mine = "never" if math.isnan(c["rezero_steps"]) else f"{c['rezero_steps']:.0f}"
        none = "" if c["none_reached"] is None else (
            f"; residual without normalization: target in {c['none_reached']}/{seeds} seeds, "
            f"final loss {c['none_final_loss']:.3g}")
        print(f"{c['stack']} depth {c['depth']}: ReZero trains without normalization: "
              f"{'yes' if c['rezero_trains'] else 'no'}; fastest to the target: {'yes' if c['rezero_fastest'] else 'no'}"
              f" (mean steps to target: ReZero {mine}; {others}){none}")
    (out / "rezero").mkdir(exist_ok=True)
    png = rz.plot(rows, runs, out / "rezero" / ("rezero-smoke.png" if args.smoke else "rezero.png"))
    if png:
        print(f"wrote {png}")
    summary = {"rows": rows, "claims": claims, "plot": str(png) if png else None, "seeds": seeds,
               "stacks": {k: rz.STACKS[k] for k in stacks}, "budget_steps": steps, "lr": rz.LR, "smoke": args.smoke,
               "engine": "population", "optimizer": "adam",
               "cpu_seconds": round(sum(r["cpu_seconds"] for r in runs), 1)}
    summary["run_id"] = add_run(out, "rezero", "rezero-smoke" if args.smoke else "rezero", "finished",
                                {"depths": depths, "stacks": stacks, "norms": norms, "seeds": seeds, "steps": steps},
                                summary, [{k: v for k, v in r.items()} for r in runs], environment())
    if args.json:
        _emit_json(summary)
    return 0


COMMANDS = {"speedrun": cmd_speedrun, "rezero": cmd_rezero}
