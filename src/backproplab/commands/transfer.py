"""`backproplab transfer`: pre-train, fine-tune with layers frozen against scratch at fractions of
the target set; --continual adds task A then task B with and without Learning without Forgetting."""
import time

from ..errors import UserError
from ..jsonout import emit_json


def register(sub, add_common):
    t = sub.add_parser("transfer", help="transfer (pre-train on Fashion-MNIST or digits 0-4, fine-tune with "
                                        "layers frozen, against scratch) and forgetting (with and without lwf)")
    add_common(t)
    t.add_argument("--from", dest="sources", default="fashion,digits04",
                   help="source tasks: fashion (-> the 1989 digits), digits04 (-> digits 5-9); default both")
    t.add_argument("--freeze", default="none,h1,h1+h2",
                   help="arms: comma-separated, each none or layers joined by + (h1, h2, h3); default none,h1,h1+h2")
    t.add_argument("--fractions", default="0.01,0.1,1", help="fractions of the target training set (default 0.01,0.1,1)")
    t.add_argument("--seeds", type=int, default=4, help="seeds (replicas) per arm (default 4)")
    t.add_argument("--passes", type=int, default=20, help="fine-tuning passes (more for small fractions: at least "
                                                          "400 steps; default 20)")
    t.add_argument("--pretrain-passes", type=int, default=20, help="passes on the source task (default 20)")
    t.add_argument("--continual", action="store_true", help="also: digits 0-4 then 5-9, forgetting with and without lwf")
    t.add_argument("--lwf-lam", type=float, default=1.0, help="lwf's weight of the old-task term (default 1)")
    t.add_argument("--smoke", action="store_true", help="test size: 300 images a task, 1 pass, 2 seeds")


def _table(rows) -> str:
    lines = [f"{'source':9s} {'fraction':>8s} {'n':>5s} {'passes':>6s} {'arm':8s} {'test error':>16s} "
             f"{'- scratch [95% CI]':>24s}"]
    for r in rows:
        ci = "" if r["arm"] == "scratch" else f"{r['minus_scratch']:+6.2f} [{r['ci_low']:+6.2f}, {r['ci_high']:+6.2f}]"
        lines.append(f"{r['source']:9s} {r['fraction']:8g} {r['n_train']:5d} {r['passes']:6d} {r['arm']:8s} "
                     f"{r['test_error']:6.2f} +- {r['test_error_std']:5.2f}% {ci:>24s}")
    return "\n".join(lines)


def _ctable(rows) -> str:
    lines = [f"{'continual (A: 0-4, B: 5-9)':26s} {'A after A':>9s} {'A after B':>9s} {'forgetting':>16s} "
             f"{'(all 10 units)':>14s} {'B error':>8s} {'- fine-tune [95% CI]':>24s}"]
    for r in rows:
        ci = f"{r['minus_finetune']:+6.2f} [{r['ci_low']:+6.2f}, {r['ci_high']:+6.2f}]" if "minus_finetune" in r else ""
        lines.append(f"{r['arm']:26s} {r['A_error_after_A']:8.2f}% {r['A_error_after_B']:8.2f}% "
                     f"{r['forgetting']:+7.2f} +- {r['forgetting_std']:5.2f} {r['forgetting_all_units']:+13.2f} "
                     f"{r['B_error']:7.2f}% {ci:>24s}")
    return "\n".join(lines)


def _plot(rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for src in sorted({r["source"] for r in rows}):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for arm in dict.fromkeys(r["arm"] for r in rows if r["source"] == src):
            rr = [r for r in rows if r["source"] == src and r["arm"] == arm]
            ax.errorbar([r["n_train"] for r in rr], [r["test_error"] for r in rr],
                        yerr=[r["test_error_std"] for r in rr], marker="o", capsize=3, label=arm)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("target training digits")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"from {src}: fine-tuned (frozen layers) vs scratch")
        ax.legend()
        fig.tight_layout()
        p = out / f"transfer_{src}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


def cmd_transfer(args):
    from ..experiments import transfer as tr
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    for s in sources:
        if s not in tr.SOURCES:
            raise UserError(f"--from {s}: choose from {', '.join(tr.SOURCES)}")
    arms = tr.parse_arms(args.freeze)
    fractions = tr.parse_fractions(args.fractions)
    if args.seeds < 2 or args.passes < 1 or args.pretrain_passes < 1:
        raise UserError("--seeds must be >= 2 (a spread and a CI), --passes and --pretrain-passes >= 1")
    if not 0 <= args.lwf_lam <= 100:
        raise UserError(f"--lwf-lam {args.lwf_lam}: must be in [0, 100]")
    from ..engine.train import environment, prepare_out
    from ..store import add_run, check_store
    check_store(args.out)
    out = prepare_out(args.out)
    seeds, passes, pre = (2, 1, 1) if args.smoke else (args.seeds, args.passes, args.pretrain_passes)
    log = (lambda s: None) if args.json else print
    t0 = time.perf_counter()
    rows, crow, secs = [], [], {}
    for src in sources:
        t = time.perf_counter()
        rows += tr.run_transfer(src, arms, fractions, seeds, passes, pre, smoke=args.smoke, log=log)
        secs[src] = round(time.perf_counter() - t, 1)
    if args.continual:
        t = time.perf_counter()
        crow = tr.run_continual(seeds, passes, args.lwf_lam, smoke=args.smoke, log=log)
        secs["continual"] = round(time.perf_counter() - t, 1)
    print(_table(rows))
    if crow:
        print(_ctable(crow))
    (out / "transfer").mkdir(exist_ok=True)
    plots = _plot(rows, out / "transfer")
    summary = {"rows": rows, "continual": crow, "seeds": seeds, "passes": passes, "pretrain_passes": pre,
               "seconds": secs, "seconds_total": round(time.perf_counter() - t0, 1), "plots": plots}
    run_id = add_run(out, "transfer", "transfer", "finished", {"sources": sources, "freeze": args.freeze,
                     "fractions": fractions, "seeds": seeds, "passes": passes, "pretrain_passes": pre,
                     "continual": bool(args.continual), "lwf_lam": args.lwf_lam}, summary, [], environment())
    summary["run_id"] = run_id
    print(f"{summary['seconds_total']:.0f} s; plots: {', '.join(plots)}")
    if args.json:
        emit_json(summary)
    return 0


COMMANDS = {"transfer": cmd_transfer}
