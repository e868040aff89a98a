"""`backproplab nas`: architecture search over the convnet family at a fixed budget (search/nas.py).

  nas [DIM=V,...] [--budget 10000] [--metric params|macs] [--passes 3] [--evals 10]
      [--search-seeds 20] [--strategies random,evolution,tpe] [--population 10 --sample 3]

Trains every architecture of the space under the budget at low fidelity (the ground truth,
cached in --out/nas/), runs each strategy on it with the same compute over n search seeds,
reports regrets, the synflow proxy's and the parameter count's rank correlations, and the
test error of the best architecture by validation error, retrained once on the whole
training set.
"""
import hashlib
import json
import sys
from pathlib import Path

from ..errors import UserError
from ..jsonout import emit_json

SMOKE = dict(dims=["depth=0,1", "width=1,2", "kernel=3", "block=plain,separable"], n_train=400, val=100,
             n_test=200, passes=2, evals=2, seeds=3, population=2, sample=2)


def register(sub, add_common):
    p = sub.add_parser("nas", help="architecture search over the convnet family at a fixed parameter or "
                                   "multiply-add budget: regularized evolution, TPE and random search")
    add_common(p)
    p.add_argument("dims", nargs="*", metavar="DIM=V,...",
                   help="narrow a dimension: depth=0,1,2,3 width=1,...,6 kernel=3,5 "
                        "block=plain,separable,inverted_residual (default: all)")
    p.add_argument("--budget", type=float, default=10_000, help="at most this many parameters (or multiply-adds "
                                                                "with --metric macs); default 10000")
    p.add_argument("--metric", default="params", help="params (default) or macs")
    p.add_argument("--passes", type=int, default=3, help="passes of the ground-truth table (its fidelity; "
                                                         "lower fidelities are its earlier passes); default 3")
    p.add_argument("--evals", type=float, default=10, help="compute of each search, in trainings at the table's "
                                                           "fidelity (a search at 1 pass gets passes x more); "
                                                           "default 10")
    p.add_argument("--search-seeds", type=int, default=20, help="searches per strategy (default 20)")
    p.add_argument("--strategies", default="random,evolution,tpe", help="comma-separated (default all three)")
    p.add_argument("--population", type=int, default=10, help="regularized evolution: population (default 10)")
    p.add_argument("--sample", type=int, default=3, help="regularized evolution: tournament sample (default 3)")
    p.add_argument("--val", type=int, default=1000, help="validation digits carved from the training set "
                                                         "(default 1000)")
    p.add_argument("--n-train", type=int, help="use the first n training digits (before the carve-out)")
    p.add_argument("--seed", type=int, default=0, help="initialization seed of every trained architecture")
    p.add_argument("--final-passes", type=int, help="passes of the final retraining on the whole training set "
                                                    "(default --passes)")
    p.add_argument("--smoke", action="store_true", help="test size: 8 architectures, 400 digits, 2 passes")


def _ints(name, v, lo=1):
    if v is None or v < lo:
        raise UserError(f"--{name} must be at least {lo}, not {v}")
    return v


def cmd_nas(args):
    from ..search import nas
    o = dict(dims=args.dims, n_train=args.n_train, val=args.val, n_test=None, passes=args.passes,
             evals=args.evals, seeds=args.search_seeds, population=args.population, sample=args.sample)
    if args.smoke:
        o.update(SMOKE, dims=args.dims or SMOKE["dims"])
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for s in strategies:
        if s not in nas.STRATEGIES:
            raise UserError(f"unknown search strategy {s!r}; choose {', '.join(nas.STRATEGIES)}")
    if not strategies:
        raise UserError("--strategies is empty")
    passes = _ints("passes", o["passes"])
    seeds = _ints("search-seeds", o["seeds"])
    if not o["evals"] > 0:
        raise UserError(f"--evals must be positive, not {o['evals']}")
    if not 1 <= o["sample"] <= o["population"]:
        raise UserError(f"evolution needs 1 <= --sample ({o['sample']}) <= --population ({o['population']})")
    if not (args.budget > 0):
        raise UserError(f"--budget must be positive, not {args.budget}")
    dims = nas.parse_space(o["dims"])
    archs = nas.space(args.budget, args.metric, dims)          # bad input ends here, before any training
    final_passes = _ints("final-passes", args.final_passes or passes)

    from ..data import load_dataset
    full = load_dataset(n_train=o["n_train"], n_test=o["n_test"])
    if not 0 < o["val"] < len(full.train_x):
        raise UserError(f"--val {o['val']} must leave training digits: the training set has {len(full.train_x)}")
    data = full.with_validation(o["val"])
    out = Path(args.out) / "nas"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror}") from None
    settings = {"n_train": len(data.train_x), "val": o["val"], "data": data.fingerprint(), "recipe": "modern-nas-1"}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    quiet = args.json

    def log(line):
        if not quiet:
            print(line, flush=True)
    log(f"{len(archs)} architectures with at most {args.budget:g} {args.metric}; training each for {passes} "
        f"passes on {len(data.train_x)} digits, validation on {o['val']}")
    tab = nas.table(archs, data, passes, out / f"table-{tag}-p{passes}-s{args.seed}.json", args.seed, log, settings)

    compute = o["evals"] * passes
    runs = [(passes, compute)] + ([(1, compute)] if passes > 1 else [])
    rows = nas.compare(tab, archs, strategies, runs, seeds, o["population"], o["sample"], dims)
    proxy = nas.proxy_report(tab)
    truth = {k: v["errors"][passes - 1] for k, v in tab.items()}
    best_key = min(truth, key=truth.get)
    best = nas.Arch(**tab[best_key]["arch"])
    by_params = max(archs, key=lambda a: (a.params, a.key))
    diffs = {}
    reg = {(r["strategy"], r["fidelity"]): r["regrets"] for r in rows}
    for fid, _ in runs:
        for strat in ("evolution", "tpe"):
            if (strat, fid) in reg and ("random", fid) in reg:
                diffs[f"{strat}_minus_random_fidelity_{fid}"] = nas.diff_ci(reg[(strat, fid)], reg[("random", fid)])

    # the chosen architecture (best validation error of the exhaustive table), retrained on the
    # whole training set: its test error, reported once
    final = nas.train_arch(best, full, final_passes, args.seed, split="test")
    result = {"architectures": len(archs), "budget": args.budget, "metric": args.metric, "passes": passes,
              "train_digits": len(data.train_x), "val_digits": o["val"], "best": best_key,
              "best_val_error": truth[best_key], "largest": by_params.key, "largest_val_error": truth[by_params.key],
              "search": rows, "differences": diffs, "proxy": proxy,
              "final": {"arch": best_key, "passes": final_passes, "train_digits": len(full.train_x),
                        "test_error": final["errors"][-1]},
              "table_seconds": sum(v["seconds"] for v in tab.values())}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    if not quiet:
        print(f"\nground truth: best {best_key} {truth[best_key]:.2f}% validation error; the largest "
              f"({by_params.key}) {truth[by_params.key]:.2f}%")
        print(f"{'strategy':10s} {'fidelity':>8s} {'evals':>6s} {'spent':>6s} {'regret (pp)':>16s} {'found best':>10s}")
        for r in rows:
            print(f"{r['strategy']:10s} {r['fidelity']:8d} {r['evaluations']:6.0f} {r['evaluations_spent_mean']:6.1f} "
                  f"{r['regret_mean']:7.2f} +- {r['regret_std']:5.2f} {r['found_best']:5d}/{r['seeds']}")
        for k, (d, lo, hi) in diffs.items():
            print(f"{k}: {d:+.2f} pp (95% CI {lo:+.2f} to {hi:+.2f}; {seeds} search seeds each)")
        print(f"rank correlation with -validation error over {proxy['architectures']} architectures: synflow "
              f"{proxy['synflow']:+.2f}, parameters {proxy['params']:+.2f}, multiply-adds {proxy['macs']:+.2f}"
              + "".join(f", {k.replace('_', ' ')} {v:+.2f}" for k, v in proxy.items() if k.startswith("val_after")))
        print(f"chosen {best_key}: test error {final['errors'][-1]:.2f}% after {final_passes} passes on "
              f"{len(full.train_x)} digits (reported once)", file=sys.stdout)
    if args.json:
        emit_json(result)
    return 0


COMMANDS = {"nas": cmd_nas}
