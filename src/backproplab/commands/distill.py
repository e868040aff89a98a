"""`backproplab distill`: does a distilled Net1989 beat the same net alone? A teacher ensemble, a
temperature sweep chosen on validation, the distilled and born-again students (experiments/distill.py).
One distilled run alone is `backproplab train modern +method=distill:teacher=DIR,T=4`."""
import json

from ..errors import UserError
from ..jsonout import emit_json, json_safe

DEFAULTS = {"seeds": 8, "passes": 10, "teacher_passes": 20, "teacher_seeds": 8, "sweep_seeds": 4, "val": 1000}
SMOKE = {"seeds": 2, "passes": 1, "teacher_passes": 1, "teacher_seeds": 2, "sweep_seeds": 2, "val": 100}


def register(sub, add_common):
    p = sub.add_parser("distill", help="distillation study: teacher ensemble -> Net1989 students (T chosen on "
                                       "validation), born-again, against the net alone (95%% CI)")
    add_common(p)
    for k, v in DEFAULTS.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"default {v} (smoke {SMOKE[k]})")
    p.add_argument("--temperatures", default="2.5,4,20", help="T to sweep (default 2.5,4,20)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the soft term (default 0.5)")
    p.add_argument("--smoke", action="store_true", help="test size: 500/200 digits, 1-pass runs, 2 seeds")


def cmd_distill(args):
    size = SMOKE if args.smoke else DEFAULTS
    opts = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in size.items()}
    for k, v in opts.items():
        if v < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1, not {v}")
    try:
        temps = [float(t) for t in args.temperatures.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--temperatures: {args.temperatures!r} is not a comma-separated list of numbers") from None
    if not temps or min(temps) <= 0:
        raise UserError(f"--temperatures: {args.temperatures!r}: give temperatures above 0")
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha {args.alpha}: must be in [0, 1]")
    from ..engine.train import environment, prepare_out
    from ..experiments import distill as dx
    from ..store import add_run
    out = prepare_out(args.out)
    res = dx.run(out / "distill", temps=temps, alpha=args.alpha, smoke=args.smoke,
                 log=lambda s: print(s, flush=True), **opts)
    t, a, d, b = res["teacher"], res["alone"], res["distilled"], res["born_again"]
    print(f"\nteacher ensemble {t['ensemble_test_error']:.2f}%  alone {a['test_error']:.2f} +- "
          f"{a['test_error_std']:.2f}%  distilled (T={res['T']:g}) {d['test_error']:.2f} +- {d['test_error_std']:.2f}%"
          f"  born-again {b['test_error']:.2f} +- {b['test_error_std']:.2f}%  ({res['seeds']} seeds)")
    for lab, r in (("distilled", d), ("born-again", b)):
        v = r["vs_alone"]
        print(f"  {lab} - alone: {v['diff']:+.2f} points, 95% CI [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}], p={v['p']:.3g}")
    print(f"  gap to the teacher closed: {100 * res['gap_closed']:.0f}% (target 50%); {res['seconds']:.0f} s")
    (out / "distill" / "distill.json").write_text(json.dumps(json_safe(res), indent=1, sort_keys=True))
    res["run_id"] = add_run(out, "distill", "distill", "finished", {**opts, "temps": temps, "alpha": args.alpha},
                            json_safe(res), [], environment())
    if args.json:
        emit_json(res)
    return 0


COMMANDS = {"distill": cmd_distill}
