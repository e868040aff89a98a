"""scale fit --compare: two recipes of known constants are told apart (an exponent change is
"exponents differ", a constant change only "only constants differ", equal laws resolve nothing),
and a store holding two recipes is fitted recipe by recipe (never averaged together)."""
import pytest

from backproplab.errors import UserError
from backproplab.scaling import compare as cmp
from backproplab.scaling.runs import load_runs_from_store, recipe_of, store_recipes
from backproplab.scaling.synthetic import synthetic_runs

TRUTH = dict(E=1.7, A=400.0, B=1000.0, alpha=0.34, beta=0.28)
GRID = dict(n_N=4, n_D=5, noise=0.01)   # 20 runs a recipe; the data term is the identifiable one here


def pair(seed, **b):
    return synthetic_runs(**TRUTH, **GRID, seed=seed), synthetic_runs(**{**TRUTH, **b}, **GRID, seed=seed + 1)


def test_a_changed_constant_alone_is_only_constants():
    """E 1.7 -> 1.4 with the exponents equal: E's difference is found (its interval holds -0.3 and
    excludes 0) and neither exponent's interval excludes 0 (no false change of slope)."""
    ra, rb = pair(0, E=1.4)  # (a 95% interval on each of two exponents: about 1 seed in 10 shows a false change)
    c = cmp.compare_fits(ra, rb, ("base", "ema"), n_boot=30)
    assert c["verdict"].startswith("only constants differ")
    lo, hi = c["differences"]["E"]["ci"]
    assert lo <= -0.3 <= hi and hi < 0
    for k in ("alpha", "beta"):
        assert c["differences"][k]["ci"][0] <= 0 <= c["differences"][k]["ci"][1]


def _store(tmp_path, runs_by_recipe):
    """Scale records as `scale run` writes them (one per run), methods in the config."""
    from backproplab.store import add_run
    for methods, runs in runs_by_recipe:
        for i in range(len(runs)):
            s = {"N": runs.N[i], "D": runs.D[i], "C": runs.C[i], "loss": runs.loss[i], "lr": runs.lr[i],
                 "epochs": runs.epochs[i], "family": "convnet", "n_train": 7291}
            cfg = {"split": "last", "n_val": 1000, **({"methods": methods} if methods else {})}
            add_run(tmp_path, "scale", "cell", "finished", cfg, s, [], {})
    return tmp_path


def test_a_store_of_two_recipes_is_fitted_apart_and_refused_as_one(tmp_path):
    """beta 0.28 -> 0.32 in the second recipe's records: fitted apart, "exponents differ", and the
    difference's interval holds the true +0.04."""
    ra, rb = pair(30, beta=0.32)
    db = _store(tmp_path, [(None, ra), ([{"name": "sam", "options": {"rho": 0.05}}], rb)])
    assert store_recipes(db) == {"base": len(ra), "sam:rho=0.05": len(rb)}
    assert recipe_of({"methods": [{"name": "ema", "options": {}}]}) == "ema"
    with pytest.raises(UserError, match="2 recipes"):  # one fit of both would average their cells
        load_runs_from_store(db)
    assert len(load_runs_from_store(db, recipe="base")) == len(ra)
    rep = cmp.compare_store(db, ["base", "sam:rho=0.05"], n_boot=30)
    c = rep["families"]["convnet"]
    assert c["verdict"] == "exponents differ" and c["n_runs"] == [len(ra), len(rb)]
    lo, hi = c["differences"]["beta"]["ci"]
    assert lo <= 0.04 <= hi and lo > 0
    assert "exponents differ" in cmp.compare_text(rep)
    with pytest.raises(UserError, match="no scale runs of recipe nosuch"):
        cmp.compare_store(db, ["base", "nosuch"])
    from backproplab.cli import main
    assert main(["scale", "fit", str(db), "--compare", "base"]) == 2
    assert main(["scale", "fit", str(db), "--n-boot", "0"]) == 2  # two recipes, no --compare or --recipe
    with pytest.raises(UserError, match="two different recipes"):
        cmp.parse_compare("base")
    with pytest.raises(UserError, match="two different recipes"):
        cmp.parse_compare("base,base")
