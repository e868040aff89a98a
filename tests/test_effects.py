"""Effects: the statistics against scipy, time to the base's error and composition on known
curves, methods that cannot run on the base skipped with a reason, a smoke run of the command."""
import json

import numpy as np
import pytest
from scipy import stats

from backproplab.engine.train import Result
from backproplab.errors import UserError
from backproplab.experiments import effects as fx
from conftest import run_cli


def _split(row):
    return [{"error": e, "loss": 0.0, "misses": 0} for e in row]


def fake(errors_by_pass, seconds_by_pass, test_at_end=None):
    """A Result whose replicas have these errors after each pass (rows: passes, cols: seeds): on the
    test split, or, given test_at_end (the final test errors), on the validation split with the test
    split evaluated after the last pass only (the default effects protocol)."""
    split = "test" if test_at_end is None else "val"
    hist = [{"pass": p + 1, "seconds": s, "train": [], split: _split(row)}
            for p, (row, s) in enumerate(zip(errors_by_pass, seconds_by_pass))]
    final = [{"seed": k, f"{split}_error": e} for k, e in enumerate(errors_by_pass[-1])]
    if test_at_end is not None:
        hist[-1]["test"] = _split(test_at_end)
        for f, e in zip(final, test_at_end):
            f["test_error"] = e
    return Result({}, list(range(len(final))), hist, final, float(sum(seconds_by_pass)), 0.0)


def test_welch_interval_and_p_value_match_scipy():
    a, b = [1.9, 2.1, 1.7, 2.4, 2.0], [2.2, 2.6, 2.3, 2.9]
    d, lo, hi, p = fx.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert d == pytest.approx(np.mean(a) - np.mean(b))
    assert (lo, hi, p) == pytest.approx((ci.low, ci.high, ref.pvalue), rel=1e-9)
    assert np.isnan(fx.welch([1.0], [2.0, 3.0])[1])


def test_time_to_base_speedup_and_composition_on_known_curves():
    # 2 seeds each; seconds are for both seeds together (the engine trains them in turn)
    results = {
        "base": fake([[5, 5], [3, 3], [2, 2], [2, 2]], [2, 2, 2, 2]),      # reaches its final 2.0 at pass 3: 3 s a seed
        "a": fake([[4, 4], [2, 2], [1.5, 1.5], [1.4, 1.6]], [2, 2, 2, 2]),  # 2.0 at pass 2: 2 s a seed
        "b": fake([[2, 2], [1, 1], [1, 1], [1, 1]], [4, 4, 4, 4]),          # 2.0 at pass 1: 2 s a seed
        "a+b": fake([[1, 3], [1, 1], [1, 1], [1, 1]], [2, 2, 2, 2]),        # mean 2.0 at pass 1: 1 s a seed
        "c": fake([[9, 9], [8, 8], [7, 7], [6, 6]], [1, 1, 1, 1]),          # never
        "d": fake([[3, 3], [2, 2], [2, 2], [2, 2]], [4, 4, 4, 4]),          # 2.0 at pass 2: 4 s a seed
    }
    rows = {r["method"]: r for r in fx.analyse(results, "base")}
    assert rows["base"]["time_to_base"] == 3.0 and rows["base"]["speedup"] == 1.0
    assert rows["a"]["time_to_base"] == 2.0 and rows["a"]["passes_to_base"] == 2
    assert rows["a"]["speedup"] == pytest.approx(1.5) and rows["b"]["speedup"] == pytest.approx(1.5)
    assert rows["b"]["speedup_passes"] == pytest.approx(3.0)
    assert rows["c"]["time_to_base"] is None and rows["c"]["speedup"] is None
    assert rows["a"]["diff"] == pytest.approx(-0.5) and rows["b"]["seconds_per_seed"] == pytest.approx(8.0)
    comp = fx.compose(list(rows.values()))
    assert len(comp) == 1 and comp[0]["pair"] == "a+b"
    assert comp[0]["speedup"] == pytest.approx(3.0) and comp[0]["product"] == pytest.approx(2.25)
    assert comp[0]["ratio"] == pytest.approx(3.0 / 2.25)
    assert rows["d"]["speedup"] == pytest.approx(0.75)
    with pytest.raises(UserError, match="validation split"):  # the test curve never chooses what runs next
        fx.top_pairs(list(rows.values()), 2)
    assert fx.top_pairs(list(rows.values()), 0) == []


def test_validation_curve_times_the_runs_and_chooses_the_pairs():
    """With a validation split the times, speed-ups and the pairs come from the validation curve and
    the base's final validation error; the test errors (seen once, at the end) only fill the error
    columns. Here the test split ranks the methods the other way round: it must not matter."""
    results = {
        "base": fake([[5, 5], [3, 3], [2, 2], [2, 2]], [2, 2, 2, 2], test_at_end=[2.5, 2.5]),
        "a": fake([[4, 4], [2, 2], [1.5, 1.5], [1.4, 1.6]], [2, 2, 2, 2], test_at_end=[1.0, 1.0]),  # val 2.0 at pass 2
        "b": fake([[2, 2], [1, 1], [1, 1], [1, 1]], [4, 4, 4, 4], test_at_end=[3.0, 3.0]),          # val 2.0 at pass 1
        "d": fake([[3, 3], [2, 2], [2, 2], [2, 2]], [4, 4, 4, 4], test_at_end=[0.5, 0.5]),          # val 2.0 at pass 2
        "c": fake([[9, 9], [8, 8], [7, 7], [6, 6]], [1, 1, 1, 1], test_at_end=[0.1, 0.1]),          # val: never
    }
    rows = {r["method"]: r for r in fx.analyse(results, "base")}
    assert all(r["timing_split"] == "val" and r["base_error"] == 2.0 for r in rows.values())
    assert rows["base"]["time_to_base"] == 3.0 and rows["a"]["time_to_base"] == 2.0
    assert rows["b"]["speedup"] == pytest.approx(1.5) and rows["d"]["speedup"] == pytest.approx(0.75)
    assert rows["c"]["time_to_base"] is None and rows["c"]["speedup"] is None  # the best test error: no matter
    assert rows["a"]["test_error"] == 1.0 and rows["a"]["diff"] == pytest.approx(-1.5)  # errors: the test split
    assert rows["a"]["val_error"] == pytest.approx(1.5)
    assert fx.top_pairs(list(rows.values()), 2) == [("a", "b")]
    assert fx.top_pairs(list(rows.values()), 3) == [("a", "b"), ("a", "d"), ("b", "d")]  # reached, slower: still in
    # a method whose run is the base's again (every error, every pass and seed) reached the base's error
    # too, faster by timing noise: it is marked and its pairs are not run (they would be the other alone)
    again = dict(results, z=fake([[5, 5], [3, 3], [2, 2], [2, 2]], [1, 1, 1, 1], test_at_end=[2.5, 2.5]))
    rows_z = {r["method"]: r for r in fx.analyse(again, "base")}
    assert rows_z["z"]["same_as_base"] and rows_z["z"]["speedup"] > rows_z["a"]["speedup"]
    assert not any(rows_z[m]["same_as_base"] for m in ("base", "a", "b", "c", "d"))
    assert fx.top_pairs(list(rows_z.values()), 2) == [("a", "b")]
    # the test split takes no part in the mark (it decides what is paired)
    other_test = dict(results, z=fake([[5, 5], [3, 3], [2, 2], [2, 2]], [1, 1, 1, 1], test_at_end=[0.5, 0.5]))
    assert {r["method"]: r for r in fx.analyse(other_test, "base")}["z"]["same_as_base"]
    # one value off the base's somewhere on the validation curve is another run
    near = dict(results, z=fake([[5, 5], [3, 3], [2, 2.1], [2, 2]], [1, 1, 1, 1], test_at_end=[2.5, 2.5]))
    assert not {r["method"]: r for r in fx.analyse(near, "base")}["z"]["same_as_base"]
    # a method that cannot run beside one already chosen is passed over for the next fastest
    clash = lambda x, y: {x, y} != {"a", "b"}  # noqa: E731
    assert fx.top_pairs(list(rows.values()), 2, clash) == [("a", "d")]
    assert fx.top_pairs(list(rows.values()), 3, clash) == [("a", "d")]   # b, the only other, clashes with a
    mixed = dict(results, e=fake([[1, 1], [1, 1], [1, 1], [1, 1]], [1, 1, 1, 1]))  # timed on test: not comparable
    assert {r["method"]: r for r in fx.analyse(mixed, "base")}["e"]["time_to_base"] is None


def test_effects_runs_hold_out_validation_and_see_the_test_split_once():
    cfg = fx.base_config("modern", 1, smoke=True)
    assert cfg.data.val == fx.SMOKE_VAL and not cfg.train.eval_test and not cfg.train.eval_train
    assert fx.base_config("modern", 1, smoke=False).data.val == fx.VAL == 1000
    whole = fx.base_config("modern", 1, smoke=True, val=0)
    assert whole.data.val == 0 and whole.train.eval_test
    with pytest.raises(UserError, match="smaller than"):
        fx.base_config("modern", 1, smoke=True, val=500)
    from backproplab.config import apply_overrides, preset
    with pytest.raises(UserError, match="eval_test=false needs"):
        apply_overrides(preset("modern"), ["train.eval_test=false", "train.eval_train=false"])


def test_time_to_base_on_a_curve_evaluated_every_other_pass():
    """With eval_every 2 only passes 2 and 4 are in the history: the time to the base is the
    cumulative training time at the evaluated pass (seconds_total), not the sum of the
    evaluated passes' own seconds."""
    def sparse(errors, secs):  # 4 passes, evaluated after 2 and 4
        res = fake([errors[0], errors[1]], [secs[1], secs[3]])
        for h, p, tot in zip(res.history, (2, 4), (sum(secs[:2]), sum(secs))):
            h["pass"], h["seconds_total"] = p, tot
        res.seconds = float(sum(secs))
        return res
    results = {"base": sparse([[4, 4], [2, 2]], [1, 2, 3, 4]),   # 2.0 at pass 4: 10 s for 2 seeds
               "a": sparse([[2, 2], [1, 1]], [1, 1, 1, 1])}      # 2.0 at pass 2: 2 s
    rows = {r["method"]: r for r in fx.analyse(results, "base")}
    assert rows["base"]["time_to_base"] == 5.0 and rows["base"]["passes_to_base"] == 4
    assert rows["a"]["time_to_base"] == 1.0 and rows["a"]["passes_to_base"] == 2
    assert rows["a"]["speedup"] == pytest.approx(5.0) and rows["a"]["seconds_per_seed"] == 2.0


def test_multipliers_recover_a_method_worth_twice_the_passes():
    """The base's test error follows a power law in passes with a floor; the method's is the base's
    at twice the passes (err_m(p) = err_b(2p)), on 8 seeds with 2% noise: its effective-compute
    multiplier is 2 inside its 95% interval; a method worse than the base gets one below 1."""
    from types import SimpleNamespace as NS
    rng = np.random.default_rng(0)
    law = lambda p: 1.0 + 8.0 * p ** -0.7  # noqa: E731

    def res(err):
        return Result({}, list(range(8)), [], [{"test_error": e} for e in err * (1 + 0.02 * rng.standard_normal(8))],
                      1.0, 0.0)
    P = 40
    cfgs = {k: NS(train=NS(passes=P)) for k in ("base", "twice", "half")}
    scale = {"base": 1.0, "twice": 2.0, "half": 0.5}
    results = {k: res(law(scale[k] * P)) for k in cfgs}
    bcfgs, bres = {}, {}
    for k in cfgs:
        for f in fx.MULTIPLIER_BUDGETS:
            p = round(P * f)
            bcfgs[(k, str(f))] = NS(train=NS(passes=p))
            bres[(k, str(f))] = res(law(scale[k] * p))
    rows = [{"method": k} for k in cfgs] + [{"method": "twice+half"}]
    fx.add_multipliers(rows, results, cfgs, bres, bcfgs, n_boot=300)
    by = {r["method"]: r for r in rows}
    lo, hi = by["twice"]["compute_x_ci"]
    assert lo <= 2.0 <= hi and by["twice"]["compute_x"] == pytest.approx(2.0, rel=0.2)
    assert by["twice"]["compute_x_extrapolated"]  # the base never trained 80 passes
    assert by["half"]["compute_x"] == pytest.approx(0.5, rel=0.2) and by["half"]["compute_x_ci"][1] < 1
    assert "compute_x" not in by["twice+half"]  # pairs have no budget runs
    assert "compute x" in fx.format_table([{**by["base"], **ROW}, {**by["twice"], **ROW}])


ROW = {"test_error": 1.0, "test_error_std": 0.1, "diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0,
       "seconds_per_seed": 1.0, "time_to_base": 1.0, "passes_to_base": 1, "speedup": 1.0}


def test_methods_that_cannot_run_on_the_base_are_skipped_with_the_reason():
    base = fx.base_config("modern", 1, smoke=True)
    cfgs, skipped = fx.single_configs(base, ["label_smoothing", "rezero"])
    assert list(cfgs) == ["label_smoothing"] and [s.name for s in cfgs["label_smoothing"].methods] == ["label_smoothing"]
    assert "rezero" in skipped and "resblocks" in skipped["rezero"]
    pairs, pskip = fx.pair_configs(base, [("adam", "nesterov"), ("ema", "label_smoothing")])
    assert list(pairs) == ["ema+label_smoothing"] and "optimizer" in pskip["adam+nesterov"]  # one optimizer a run
    assert sorted(s.name for s in pairs["ema+label_smoothing"].methods) == ["ema", "label_smoothing"]


def test_cli_smoke_table_plot_composition_and_records(tmp_path):
    r = run_cli("effects", "--smoke", "--methods", "label_smoothing,ema", "--pairs", "label_smoothing+ema",
                "--multipliers", "--out", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert [x["method"] for x in res["rows"]] == ["base", "label_smoothing", "ema", "label_smoothing+ema"]
    assert all(x["seeds"] == 2 for x in res["rows"]) and len(res["composition"]) == 1
    assert res["timing_split"] == "val" and res["val"] == 100 and res["passes"] == 4  # 1, 2, 4: three budgets
    by = {x["method"]: x for x in res["rows"]}
    assert all(by[m]["compute_x"] > 0 and len(by[m]["compute_x_at"]) == 3 for m in ("base", "label_smoothing", "ema"))
    assert "compute_x" not in by["label_smoothing+ema"]
    assert (tmp_path / "effects" / "pareto-modern_smoke.png").stat().st_size > 1000
    from backproplab.store import list_runs
    runs = list_runs(tmp_path)
    kinds = [x["kind"] for x in runs]
    assert kinds.count("effects-run") == 4 + 6 and kinds[-1] == "effects"  # and 3 x 2 budget runs
    budget = {x["summary"]["method"]: x["config"]["train"]["passes"] for x in runs
              if x["kind"] == "effects-run" and "@" in x["summary"]["method"]}
    assert budget == {f"{m}@{f}": p for m in ("base", "label_smoothing", "ema") for f, p in (("1/4", 1), ("1/2", 2))}
    for run in runs[:10]:  # validation after every pass; the test split once, after the last
        h = run["history"]
        assert all("val" in r for r in h) and [("test" in r) for r in h] == [False] * (len(h) - 1) + [True]
    again = run_cli("effects", "--smoke", "--methods", "label_smoothing,ema", "--pairs", "label_smoothing+ema",
                    "--multipliers", "--out", tmp_path, "--resume", "--json")
    assert again.returncode == 0, again.stderr
    assert [x["kind"] for x in list_runs(tmp_path)].count("effects-run") == 10  # resumed runs not recorded twice
    assert json.loads(again.stdout.strip().splitlines()[-1])["rows"] == res["rows"]


@pytest.mark.parametrize("args", [["--methods", "nosuch"], ["--pairs", "ema"], ["--pairs", "ema+nosuch"],
                                  ["--seeds", "0"], ["--base", "nosuch"], ["--passes", "0"], ["--eval-every", "0"],
                                  ["--val", "-1"], ["--val", "0"], ["--val", "500"]])
def test_bad_arguments_exit_2(tmp_path, capsys, args):
    from backproplab.cli import main
    assert main(["effects", "--smoke", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
