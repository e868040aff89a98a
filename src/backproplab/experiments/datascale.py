"""Data scaling: test error against training-set size, 1989 recipe vs modern recipe.

Nested subsets (the first n examples of the training set, in its stored order), one
fixed held-out test set, every cell a population of seeds, every cell resumable.
"""
import numpy as np

from ..config import preset, validate
from ..data import load_dataset
from ..errors import UserError
from .pool import run_configs

DEFAULT_SIZES = (1000, 2000, 4000, 7291, 15000, 30000, 50000)
RECIPES = {"1989": "rung1", "modern": "rung5"}
DEFAULT_PASSES = {"1989": 100, "modern": 80}


def parse_sizes(text, available: int) -> list[int]:
    if text:
        try:
            sizes = sorted({int(t) for t in text.split(",") if t.strip()})
        except ValueError:
            raise UserError(f"--sizes {text!r}: expected comma-separated integers") from None
        if not sizes or sizes[0] < 1:
            raise UserError("--sizes must be positive integers")
        if sizes[-1] > available:
            raise UserError(f"--sizes: {sizes[-1]} is larger than the {available} training examples available")
        return sizes
    return [s for s in DEFAULT_SIZES if s <= available] or [available]


def cell_configs(source, sizes, recipes, seeds, passes=None, n_test=None, smoke=False, engine=None) -> dict:
    cfgs = {}
    for rec in recipes:
        if rec not in RECIPES:
            raise UserError(f"unknown recipe {rec!r}; known: {', '.join(RECIPES)}")
        for n in sizes:
            cfg = preset(RECIPES[rec])
            cfg.name = f"datascale-{rec}-n{n}" + ("-smoke" if smoke else "")
            cfg.data.source, cfg.data.n_train, cfg.data.n_test = source, n, n_test
            cfg.train.passes = passes or (2 if smoke else DEFAULT_PASSES[rec])
            cfg.train.seeds, cfg.train.eval_every = seeds, cfg.train.passes  # evaluate once, at the end
            cfg.train.engine = engine or cfg.train.engine
            cfgs[(rec, n)] = validate(cfg)
    return cfgs


def run_datascale(source, sizes_text=None, recipes=("1989", "modern"), seeds=3, passes=None, n_test=None,
                  out=None, resume=False, jobs=2, smoke=False, log=print, engine=None):
    probe = load_dataset(source)
    sizes = [200, 400] if smoke and not sizes_text else parse_sizes(sizes_text, len(probe.train_x))
    if n_test is not None and n_test > len(probe.test_x):
        raise UserError(f"--n-test {n_test} is larger than the {len(probe.test_x)} test examples available")
    n_test = n_test or (min(500, len(probe.test_x)) if smoke else None)
    cfgs = cell_configs(source, sizes, recipes, seeds, passes, n_test, smoke, engine)
    log(f"datascale on {source}: sizes {sizes}, recipes {', '.join(recipes)}, {seeds} seeds, "
        f"test set {n_test or len(probe.test_x)}")
    results = run_configs(cfgs, out, resume, jobs, log,
                          lambda k, res: f"{k[0]:6s} n={k[1]:6d}: test error "
                                         f"{np.mean([f['test_error'] for f in res.final]):.2f}% ({res.seconds:.1f} s)",
                          label="datascale cells")
    rows = []
    for (rec, n), res in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        te = np.array([f["test_error"] for f in res.final])
        rows.append({"recipe": rec, "n_train": n, "passes": cfgs[(rec, n)].train.passes, "seeds": len(te),
                     "status": res.status, "test_error": float(te.mean()),
                     "test_error_std": float(te.std(ddof=1)) if len(te) > 1 else 0.0,
                     "test_misses": float(np.mean([f["test_misses"] for f in res.final])),
                     "train_error": float(np.mean([f["train_error"] for f in res.final])),
                     "seconds": res.seconds})
    return cfgs, results, rows


def format_table(rows) -> str:
    from ..report.console import render, table
    cols = ["recipe", ("n_train", "right"), ("passes", "right"), ("test error", "right"), ("misses", "right"),
            ("train err", "right"), ("seconds", "right")]
    return render(table(cols, [(r["recipe"], r["n_train"], r["passes"],
                                f"{r['test_error']:.2f}% +- {r['test_error_std']:.2f}", f"{r['test_misses']:.1f}",
                                f"{r['train_error']:.2f}%", f"{r['seconds']:.1f}") for r in rows]))
