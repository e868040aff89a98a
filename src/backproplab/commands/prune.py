"""`backproplab prune`: test error against the fraction of weights kept, every method from one dense
net with one fine-tuning budget (Blalock et al. 2020); `--study nm` for 2:4 masks, `--study lowrank`
for truncated SVD. See experiments/prune.py for the protocol."""
import json
import time

from ..errors import UserError
from ..jsonout import emit_json, json_safe

DEFAULTS = {"seeds": 4, "passes": 20, "ft_passes": 5, "val": 1000}
SMOKE = {"seeds": 2, "passes": 1, "ft_passes": 1, "val": 100}


def register(sub, add_common):
    p = sub.add_parser("prune", help="pruning / 2:4 / low-rank studies: test error against weights kept, from "
                                     "one dense net with one fine-tuning budget; plot and table")
    add_common(p)
    p.add_argument("--study", default="curve", help="curve (default): pruning methods x fractions; nm: 2:4 masks; "
                                                    "lowrank: truncated SVD ranks")
    p.add_argument("--methods", default="global,layerwise,random,structured",
                   help="curve: comma-separated of global, layerwise, random, structured, lottery, gradual, "
                        "iterative (default: the first four)")
    p.add_argument("--models", default="net1989,convnet:4",
                   help="curve/nm: comma-separated net1989, convnet:K (the scaling family; default net1989,convnet:4)")
    p.add_argument("--fractions", default="1,0.5,0.3,0.2,0.1,0.05,0.02",
                   help="fractions of weights kept, each in (0, 1] (default 1 down to 0.02)")
    p.add_argument("--seeds", type=int, help=f"replicas of every run (default {DEFAULTS['seeds']})")
    p.add_argument("--passes", type=int, help=f"passes of the dense net (default {DEFAULTS['passes']})")
    p.add_argument("--ft-passes", type=int, help=f"fine-tuning passes of every method (default {DEFAULTS['ft_passes']})")
    p.add_argument("--ft-lrs", default="0.003,0.006,0.012",
                   help="fine-tuning peak rates to choose from on the validation split (default 0.003,0.006,0.012)")
    p.add_argument("--val", type=int, help=f"validation digits held out of training (default {DEFAULTS['val']})")
    p.add_argument("--dense-sizes", help="curve: convnet sizes trained dense from scratch beside the pruned nets "
                                         "(default: the family members smaller than the model; smoke: 1; none: no dense nets)")
    p.add_argument("--ranks", default="16,8,4,2,1", help="lowrank: H3 ranks (default 16,8,4,2,1)")
    p.add_argument("--conv-ranks", default="6,3,1", help="lowrank: H1/H2 kernel ranks (default 6,3,1)")
    p.add_argument("--smoke", action="store_true", help="test size: 500/200 digits, 1 + 1 passes, 2 seeds")


def _floats(text, what, lo, hi, lo_open=False):
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}: {text!r} is not a comma-separated list of numbers") from None
    for v in vals:
        if not ((lo < v if lo_open else lo <= v) and v <= hi):
            raise UserError(f"{what}: {v:g} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    if not vals:
        raise UserError(f"{what}: give at least one value")
    return vals


def _ints(text, what):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}: {text!r} is not a comma-separated list of integers") from None
    if not vals or min(vals) < 1:
        raise UserError(f"{what}: give integers of at least 1")
    return vals


def _parse(args):
    from ..experiments.prune import METHODS, STUDIES, parse_model
    if args.study not in STUDIES:
        raise UserError(f"--study {args.study!r}: choose one of {', '.join(STUDIES)}")
    size = SMOKE if args.smoke else DEFAULTS
    opts = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in size.items()}
    for k in ("seeds", "passes", "ft_passes", "val"):
        if opts[k] < (0 if k == "val" else 1):
            raise UserError(f"--{k.replace('_', '-')} must be >= {0 if k == 'val' else 1}, not {opts[k]}")
    if opts["val"] == 0:
        raise UserError("--val 0 leaves no validation split to choose the fine-tuning rate on")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise UserError(f"--methods: unknown pruning method {m!r}; known: {', '.join(METHODS)}")
    if not methods:
        raise UserError("--methods: give at least one method")
    models = [parse_model(m.strip()) for m in args.models.split(",") if m.strip()]
    fractions = sorted(set(_floats(args.fractions, "--fractions", 0.0, 1.0, lo_open=True)), reverse=True)
    ft_lrs = _floats(args.ft_lrs, "--ft-lrs", 0.0, 1.0, lo_open=True)
    return opts, methods, models, fractions, ft_lrs


def cmd_prune(args):
    opts, methods, models, fractions, ft_lrs = _parse(args)
    sizes = None if args.dense_sizes is None else [] if args.dense_sizes == "none" else \
        _ints(args.dense_sizes, "--dense-sizes")
    if sizes is None and args.smoke:
        sizes = [1]
    for k in sizes or []:
        from ..models.convnet import layer_specs
        layer_specs(k)
    h3 = conv = None
    if args.study == "lowrank":
        from ..config import apply_overrides, preset
        h3, conv = _ints(args.ranks, "--ranks"), _ints(args.conv_ranks, "--conv-ranks")
        for r in h3:   # a rank the layer cannot have is named before anything trains
            apply_overrides(preset("modern_smoke"), [f"+method=lowrank:h3={r}"])
        for r in conv:
            apply_overrides(preset("modern_smoke"), [f"+method=lowrank:h3=0,conv={r}"])
    from ..engine.train import environment, prepare_out
    from ..experiments import prune as px
    from ..report.console import render, table
    from ..store import add_run
    out = prepare_out(args.out)
    folder = out / "prune"
    folder.mkdir(exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    results = []
    if args.study == "curve":
        for m in models:
            res = px.run_curve(m, methods, fractions, opts["seeds"], opts["passes"], opts["ft_passes"], ft_lrs,
                               opts["val"], args.smoke, log, small_sizes=sizes)
            res["plot"] = px.plot_curve(res, folder / f"curve-{res['model'].replace(':', '')}.png")
            results.append(res)
    elif args.study == "nm":
        for m in models:
            results.append(px.run_nm(m, opts["seeds"], opts["passes"], opts["ft_passes"], ft_lrs[0], opts["val"],
                                     args.smoke, log))
    else:
        res = px.run_lowrank(opts["seeds"], opts["passes"], opts["ft_passes"], ft_lrs[0], opts["val"], args.smoke,
                             h3, conv, log)
        res["plot"] = px.plot_lowrank(res, folder / "lowrank.png")
        results.append(res)
    seconds = time.perf_counter() - t0
    for res in results:
        print(render(_table(res, table)))
        if res.get("targets"):
            for m, t in res["targets"].items():
                if "ci" in t:
                    print(f"  {res['model']} {m}: {100 * t['removed']:.0f}% removed ({t['compression']:.1f}x) within "
                          f"{px.TOLERANCE} points of dense: diff {t['diff']:+.2f} [{t['ci'][0]:+.2f}, {t['ci'][1]:+.2f}]")
                else:
                    print(f"  {res['model']} {m}: {t['note']}")
        if res.get("plot"):
            print(f"wrote {res['plot']}")
        if res["study"] == "nm":
            print("  " + res["cpu_note"] + (f"; CUDA: {res['cuda_timing']}" if res["cuda_timing"] else
                                            "; no CUDA device here: the 2:4 kernel path was not timed"))
    print(f"{args.study} study: {seconds:.0f} s")
    summary = {"study": args.study, "seconds": round(seconds, 1), "results": results, "smoke": args.smoke, **opts}
    (folder / f"{args.study}.json").write_text(json.dumps(json_safe(summary), indent=1, sort_keys=True))
    summary["run_id"] = add_run(out, "prune", f"prune:{args.study}", "finished", {"study": args.study, **opts},
                                json_safe(summary), [], environment())
    if args.json:
        emit_json(summary)
    return 0


def _table(res, table):
    if res["study"] == "lowrank":
        cols = ["H3 rank", "conv rank", "params", "fine-tuned", "test error %", "+-"]
        rows = [[str(r["h3"]), str(r["conv"]), str(r["factored_params"]), "yes" if r["fine_tuned"] else "no",
                 f"{r['test_error']:.2f}", f"{r['test_error_std']:.2f}"] for r in res["rows"]]
    elif res["study"] == "nm":
        cols = ["", "test error %", "+-", "weights removed", "MACs removed", "vs dense (95% CI)"]
        rows = [[r["method"], f"{r['test_error']:.2f}", f"{r['test_error_std']:.2f}",
                 f"{r['weights_removed']}/{r['weights']}", f"{r['macs_removed']}/{r['macs']}",
                 (f"{r['vs_dense']['diff']:+.2f} [{r['vs_dense']['ci'][0]:+.2f}, {r['vs_dense']['ci'][1]:+.2f}]"
                  if "vs_dense" in r else "")] for r in res["rows"]]
    else:
        cols = ["method", "kept (asked)", "kept", "nonzero params", "val error %", "test error %", "+-"]
        rows = [[r["method"] + (f" convnet:{r['size']}" if r.get("size") else ""),
                 "" if r["keep"] is None else f"{r['keep']:.2f}", f"{r['kept_fraction']:.3f}",
                 f"{r['nonzero_params']:.0f}", f"{r['val_error']:.2f}", f"{r['test_error']:.2f}",
                 f"{r['test_error_std']:.2f}"] for r in res["rows"]]
    return table(cols, rows, title=f"{res['study']} {res['model']}: {res['seeds']} seeds, {res['passes']} + "
                                   f"{res['ft_passes']} passes, fine-tuning lr {res['ft_lr']:g}")


COMMANDS = {"prune": cmd_prune}
