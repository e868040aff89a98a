"""Search benchmarks, both parts measured in one run (python benchmarks/bench_search.py [--quick]):

1. Workers: the same 40-trial search (a 40-point grid over optim.lr x model.act on lecun1989, each
   trial the whole 23-pass replay, so both runs train exactly the same trials) with 1 worker and
   with 2 worker processes on journal storage; wall seconds and the ratio, median of --repeats
   interleaved repeats.
2. Pruning: TPE with ASHA against TPE without pruning (40 trials) on 3 search seeds; the ASHA
   search may run up to --asha-trials trials (default 120: pruned trials are cheap, so it can try
   more for the same compute). Compute is passes trained (every pass costs the same: same data,
   same model). For each seed: the compute the ASHA search spends until a finished trial first
   reaches the unpruned search's best validation error, as a fraction of the unpruned search's
   total compute (and of the compute it took the unpruned search to find its best); None when
   it never does. Mean and spread over the seeds that reached it.
Objective: validation error on data.val digits carved from the training set; the test split is
cut to 200 digits (no trial looks at it) to keep evaluation cheap. Results:
benchmarks/results/bench_search.json.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from backproplab.search import hpo  # noqa: E402
from backproplab.search import study as st  # noqa: E402
from backproplab.search.space import parse_space  # noqa: E402

# speed: each trial a whole 1989 replay (23 passes, about 2 s on the fast engine), so that a trial's
# training, not a worker's start-up, is what two workers share out
SPEED = {"preset": "lecun1989", "overrides": ["data.n_test=200", "train.eval_train=false", "data.val=1000"],
         "items": ["optim.lr=log:0.003:0.3", "model.act=choice:tanh,scaled_tanh"], "grid_points": 20}
PRUNE = {"preset": "lecun1989", "overrides": ["data.n_train=2000", "data.n_test=200", "train.passes=9",
                                              "train.eval_train=false", "data.val=500"],
         "items": ["optim.lr=log:1e-4:1.0", "model.act=choice:tanh,scaled_tanh,relu"], "trials": 40}


def run(cfg, folder, name, jobs, sampler="tpe", seed=0, pruner="none", grid_points=None, trials=None):
    base = hpo.base_config(cfg["preset"], cfg["overrides"])
    space = parse_space(cfg["items"], base)
    storage = st.storage_spec(None, folder)
    spec = hpo.study_spec(cfg["preset"], cfg["items"], cfg["overrides"], sampler, pruner,
                          hpo.max_passes(base, space), folder, folder, trials)
    spec["study"] = name
    objective = hpo.TrialObjective(cfg["preset"], cfg["items"], cfg["overrides"], str(folder), str(folder), name)
    grid = hpo.grid_points(space, grid_points) if grid_points else None
    t0 = time.perf_counter()
    study, codes = st.run_study(name, storage, objective, n_trials=trials, grid=grid, jobs=jobs, sampler=sampler,
                                seed=seed, pruner=st.make_pruner(pruner, spec["passes"]), spec=spec)
    wall = time.perf_counter() - t0
    assert codes == [0] * jobs, codes
    return study, wall


def trace(study):
    """Finished and pruned slot trials in completion order: (passes, value or None)."""
    rows = [t for t in st.slot_trials(study).values() if t.state.name in ("COMPLETE", "PRUNED")]
    rows.sort(key=lambda t: t.datetime_complete)
    return [(t.user_attrs.get("passes", 0), t.value if t.state.name == "COMPLETE" else None) for t in rows]


def compute_to_reach(tr, target):
    spent = 0
    for passes, value in tr:
        spent += passes
        if value is not None and value <= target + 1e-9:
            return spent
    return None


def prune_row(seed, t_none, t_asha, w_none, w_asha, trials):
    """One search seed: the pruned search's compute until it first reaches the unpruned one's best."""
    best = min(v for _, v in t_none if v is not None)
    total_none = sum(p for p, _ in t_none)
    reach_none = compute_to_reach(t_none, best)
    reach = compute_to_reach(t_asha, best)
    return {"seed": seed, "unpruned_best_val_error": best, "unpruned_passes": total_none,
            "asha_passes_first_trials": sum(p for p, _ in t_asha[:trials]),
            "asha_best_first_trials": min((v for _, v in t_asha[:trials] if v is not None), default=None),
            "unpruned_passes_to_its_best": reach_none, "asha_passes": sum(p for p, _ in t_asha),
            "asha_best_val_error": min((v for _, v in t_asha if v is not None), default=None),
            "asha_finished": sum(v is not None for _, v in t_asha),
            "asha_pruned": sum(v is None for _, v in t_asha), "asha_passes_to_reach": reach,
            "fraction_of_unpruned_total": None if reach is None else reach / total_none,
            "fraction_of_unpruned_to_best": None if reach is None else reach / reach_none,
            "wall_unpruned": w_none, "wall_asha": w_asha}


def summarize_prune(per_seed):
    fr = [r["fraction_of_unpruned_total"] for r in per_seed]
    reached = [f for f in fr if f is not None]
    return {"per_seed": per_seed, "reached": len(reached),
            "fraction_mean": statistics.mean(reached) if reached else None,
            "fraction_sd": statistics.stdev(reached) if len(reached) > 1 else None,
            "fraction_min": min(reached) if reached else None,
            "fraction_max": max(reached) if reached else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats of the 1- and 2-worker runs")
    ap.add_argument("--seeds", type=int, default=3, help="search seeds for the pruning comparison")
    ap.add_argument("--quick", action="store_true", help="a tiny check that the script runs (not a result)")
    ap.add_argument("--asha-trials", type=int, default=120, help="trials the ASHA search may run (default 120)")
    ap.add_argument("--pruners", default="asha", help="pruners separated by ;, each against the same unpruned "
                    "searches (default asha; e.g. 'asha;asha:min=3,factor=2')")
    ap.add_argument("--first-seed", type=int, default=0, help="the first search seed (default 0)")
    ap.add_argument("--sampler", default="tpe", help="the pruning part's sampler, the same for the unpruned and "
                    "the pruned searches (default tpe; e.g. tpe:startup=5,multivariate=0)")
    ap.add_argument("--prune-overrides", default="", help="space-separated config overrides added to the pruning "
                    "part's (e.g. 'data.n_train=3000 data.val=1000': a validation split with less sampling noise)")
    ap.add_argument("--skip-speed", action="store_true", help="keep the speed part of the results file as it is")
    ap.add_argument("--skip-prune", action="store_true", help="keep the pruning part of the results file as it is")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_search.json"))
    args = ap.parse_args()
    speed, prune = dict(SPEED), dict(PRUNE)
    if args.prune_overrides:
        prune["overrides"] = prune["overrides"] + args.prune_overrides.split()
    if args.quick:
        speed = {**speed, "grid_points": 2, "overrides": speed["overrides"] + ["data.n_train=600", "data.val=100"]}
        prune = {**prune, "trials": 6, "overrides": prune["overrides"] + ["data.n_train=600", "data.val=100"]}
        args.seeds, args.asha_trials = 1, 12
    res = {"cpus": os.cpu_count(), "load_before": os.getloadavg(), "speed": None, "prune": None,
           "command": "python " + " ".join(sys.argv)}
    from backproplab.engine.train import train
    train(hpo.base_config("smoke", ["train.passes=1"]))  # this process's kernels loaded before any timing
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_speed:
            walls = {1: [], 2: []}
            for r in range(args.repeats):
                for jobs in (1, 2):
                    folder = tmp / f"speed-{jobs}-{r}"
                    study, wall = run(speed, folder, "speed", jobs, sampler="grid", grid_points=speed["grid_points"])
                    tr = st.slot_trials(study)
                    assert all(t.state.name == "COMPLETE" for t in tr.values()), "a trial did not finish"
                    walls[jobs].append(wall)
                    print(f"speed repeat {r}: {jobs} worker(s) {len(tr)} trials in {wall:.1f} s", flush=True)
            m1, m2 = statistics.median(walls[1]), statistics.median(walls[2])
            res["speed"] = {"trials": len(tr), "walls_1": walls[1], "walls_2": walls[2], "median_1": m1,
                            "median_2": m2, "ratio": m1 / m2, "repeats": args.repeats, "config": speed}
            print(f"2 workers vs 1: {m1:.1f} s / {m2:.1f} s = {m1 / m2:.2f}x", flush=True)
        seeds = range(args.first_seed, args.first_seed + (0 if args.skip_prune else args.seeds))
        unpruned = {}
        for seed in seeds:
            s_none, w_none = run(prune, tmp / f"none-{seed}", f"none-{seed}", 1, sampler=args.sampler, seed=seed,
                                 trials=prune["trials"])
            unpruned[seed] = (trace(s_none), w_none)
        by_pruner = {}
        for k, pruner in enumerate(args.pruners.split(";") if not args.skip_prune else []):
            per_seed = []
            for seed in seeds:
                t_none, w_none = unpruned[seed]
                s_asha, w_asha = run(prune, tmp / f"p{k}-{seed}", f"p{k}-{seed}", 1, sampler=args.sampler, seed=seed,
                                     pruner=pruner, trials=args.asha_trials)
                t_asha = trace(s_asha)
                per_seed.append(prune_row(seed, t_none, t_asha, w_none, w_asha, prune["trials"]))
                print(pruner, json.dumps(per_seed[-1]), flush=True)
            by_pruner[pruner] = summarize_prune(per_seed)
        if by_pruner:
            res["prune"] = {"seeds": list(seeds), "trials": prune["trials"], "asha_trials": args.asha_trials,
                            "sampler": args.sampler,
                            "pruners": by_pruner, "config": prune}
    res["load_after"] = os.getloadavg()
    if args.skip_speed and Path(args.out).is_file():
        res["speed"] = json.loads(Path(args.out).read_text()).get("speed")
    if args.skip_prune and Path(args.out).is_file():
        res["prune"] = json.loads(Path(args.out).read_text()).get("prune")
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")
    print(json.dumps({k: v for k, v in res.items() if k in ("speed", "prune")}, default=str)[:2000])


if __name__ == "__main__":
    main()
