"""backproplab progress: the power law with a floor, the multipliers and their intervals on
synthetic curves made with a known multiplier (constant, and growing with compute), the Shapley
split against the subset formula, the plan's budgets, and the command end to end at smoke size."""
import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest

from backproplab.errors import UserError
from backproplab.experiments import progress as pg
from conftest import run_cli


def law(C, E=0.8, A=3.0, alpha=0.5, C0=1e9):
    return E + A * (np.asarray(C, float) / C0) ** (-alpha)


def noisy(C, f, seeds=8, rel=0.02, seed=0):
    rng = np.random.default_rng(seed)
    return [f(c) * (1 + rel * rng.standard_normal(seeds)) for c in C]


def test_the_fit_recovers_a_known_power_law_with_a_floor():
    C = np.geomspace(1e8, 1e11, 6)
    E, A, alpha, x0 = pg.fit_power_floor(C, law(C, C0=float(np.exp(np.mean(np.log(C))))))
    assert (E, A, alpha) == pytest.approx((0.8, 3.0, 0.5), rel=1e-4)
    assert pg.inverse((E, A, alpha), x0, float(law(3e9, C0=x0))) == pytest.approx(3e9, rel=1e-4)
    assert pg.inverse((E, A, alpha), x0, 0.5) == math.inf  # below the floor
    with pytest.raises(ValueError):
        pg.fit_power_floor(C[:2], law(C[:2]))


def test_a_known_constant_multiplier_is_recovered_inside_its_interval():
    """B's curve is A's shifted by m = 4 in compute (err_B(C) = err_A(4 C)) plus 2% noise on 8
    seeds: at every one of B's points the multiplier's 95% interval holds 4, the point estimate is
    within 25%, and the slopes agree (a shift, not a change of slope)."""
    C = np.geomspace(1e8, 1e11, 6)
    rng = np.random.default_rng(1)
    A = pg.Curve(C, noisy(C, law, seed=2), 300, rng)
    B = pg.Curve(C, noisy(C, lambda c: law(4 * c), seed=3), 300, rng)
    cmp_ = pg.compare(A, B)
    for m in cmp_["at"]:
        assert m["ci"][0] <= 4.0 <= m["ci"][1], m
        assert m["multiplier"] == pytest.approx(4.0, rel=0.25)
    assert cmp_["verdict"].startswith("shifts")
    assert cmp_["at"][-1]["extrapolated"]  # A never trained at 4x B's largest compute


def test_a_steeper_curve_is_a_change_of_slope_with_a_growing_multiplier():
    C = np.geomspace(1e8, 1e11, 6)
    rng = np.random.default_rng(4)
    A = pg.Curve(C, noisy(C, law, seed=5), 300, rng)
    B = pg.Curve(C, noisy(C, lambda c: law(c, alpha=0.9), seed=6), 300, rng)
    cmp_ = pg.compare(A, B)
    assert cmp_["verdict"] == "changes the slope" and cmp_["alpha_diff_ci"][0] > 0
    ms = [m["multiplier"] for m in cmp_["at"]]
    assert all(b > a for a, b in zip(ms, ms[1:]))  # the multiplier grows with compute
    truth = [pg.inverse((0.8, 3.0, 0.5), 1e9, float(law(c, alpha=0.9))) / c for c in C]
    inside = [m["ci"][0] <= t <= m["ci"][1] for m, t in zip(cmp_["at"], truth)]
    assert sum(inside) >= len(C) - 1, inside  # 95% intervals: one miss in six is chance, two is not
    near = [(m["multiplier"], t) for m, t in zip(cmp_["at"], truth) if not m["extrapolated"]]
    assert len(near) >= 3 and all(m == pytest.approx(t, rel=0.15) for m, t in near)  # inside A's range: close


def test_an_error_below_the_floor_is_beyond_it():
    C = np.geomspace(1e8, 1e11, 5)
    rng = np.random.default_rng(7)
    A = pg.Curve(C, noisy(C, law, rel=0.005, seed=8), 100, rng)
    B = pg.Curve(C, noisy(C, lambda c: law(c, E=0.2), rel=0.005, seed=9), 100, rng)
    last = pg.multiplier(A, B, len(C) - 1)
    assert last["beyond_floor"] and last["multiplier"] == math.inf and last["share_beyond_floor"] > 0.9


def shapley_by_subsets(v, n=3):
    """The subset form: phi_i = sum over S without i of |S|! (n-|S|-1)! / n! (v(S+i) - v(S))."""
    out = []
    for i in range(n):
        rest = [j for j in range(n) if j != i]
        tot = 0.0
        for k in range(n):
            for S in itertools.combinations(rest, k):
                w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
                tot += w * (v(frozenset(S) | {i}) - v(frozenset(S)))
        out.append(tot)
    return out


@pytest.mark.parametrize("v", [
    lambda S: 3 * (0 in S) + 2 * (1 in S) + 1 * (2 in S),          # additive: each its own effect
    lambda S: 4 * (0 in S and 1 in S),                              # a pure interaction: split evenly
    lambda S: [0, 1, 5, 2, 7, 3, 9, 11][(0 in S) + 2 * (1 in S) + 4 * (2 in S)],   # anything
])
def test_shapley_values_equal_the_subset_formula_and_add_up(v):
    phi = pg.shapley(v)
    assert [phi[i] for i in range(3)] == pytest.approx(shapley_by_subsets(v))
    assert sum(phi.values()) == pytest.approx(v(frozenset({0, 1, 2})) - v(frozenset()))


def test_the_decomposition_splits_the_drop_of_a_grid_of_cells():
    cells, errors = {}, {}
    for c in itertools.product((0, 1), repeat=3):
        key = ("r", *c)
        cells[c] = key
        base = 10 - 4 * c[0] - 2 * c[1] - 1 * c[2] - 1 * (c[0] and c[1])  # algorithm x data interaction
        errors[key] = [base - 0.05, base + 0.05, base]
    d = pg.decompose(cells, errors, 200, np.random.default_rng(0))
    assert d["drop"] == pytest.approx(8.0)
    assert (d["algorithm"]["points"], d["data"]["points"], d["compute"]["points"]) == pytest.approx((4.5, 2.5, 1.0))
    assert sum(d[f]["share"] for f in pg.FACTORS) == pytest.approx(1.0)
    assert d["algorithm"]["points_ci"][0] <= 4.5 <= d["algorithm"]["points_ci"][1]


def test_doubling_time_from_a_multiplier():
    assert pg.doubling_months(2.0 ** 44) == pytest.approx(9.0)  # 396 months / 44 doublings
    assert math.isnan(pg.doubling_months(0.5))


def test_the_plan_scales_each_budget_and_refuses_too_few_points():
    p = pg.plan(["rung1", "rung5"], seeds=2, smoke=True)
    c = p["curves"]["rung5"]
    assert [k[2] for k in c["compute"]] == [1, 2, 4, 8] and all(k[1] == pg.SMOKE_N for k in c["compute"])
    assert [k[1] for k in c["data"]] == [75, 150, 300] and all(k[2] == 8 for k in c["data"])
    cfg = p["configs"][("rung5", 300, 2)]
    assert cfg.train.passes == 2 and cfg.train.eval_every == 2  # its own run, schedule over its own 2 passes
    assert set(p["decompose"]["cells"].values()) >= {("rung1", 75, 2), ("rung5", 300, 8)}
    with pytest.raises(UserError, match="distinct points"):
        pg.plan(["rung1", "rung5"], budgets=(Fraction(1, 2), Fraction(1)), smoke=True)
    with pytest.raises(UserError, match="unknown recipe nosuch"):
        pg.parse_recipes("rung1,nosuch")
    with pytest.raises(UserError, match="at least two"):
        pg.parse_recipes("rung1")


@pytest.mark.parametrize("args", [["--recipes", "rung1,nosuch"], ["--recipes", "rung1"],
                                  ["--budgets", "1/2,1"], ["--budgets", "2"], ["--sizes", "x"],
                                  ["--decompose", "rung1,speedrun", "--recipes", "rung1,rung5"],
                                  ["--recipes", "rung1,rung6"], ["--seeds", "0"]])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args):
    from backproplab.cli import main
    assert main(["progress", "--smoke", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs.db").exists()


def test_progress_smoke_end_to_end(tmp_path):
    r = run_cli("progress", "--smoke", "--recipes", "rung1,rung5", "--jobs", "1", "--boot", "50",
                "--out", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    rows = {x["recipe"]: x for x in s["rows"]}
    assert set(rows) == {"rung1", "rung5"} and all(x["seeds"] == 2 for x in rows.values())
    assert [p["passes"] for p in rows["rung1"]["compute_points"]] == [1, 2, 4, 8]
    assert s["comparisons"][0]["over"] == "rung1" and s["comparisons"][0]["recipe"] == "rung5"
    assert set(s["decomposition"]) >= {"algorithm", "data", "compute", "drop"}
    from backproplab.store import list_runs
    runs = list_runs(tmp_path)
    kinds = [x["kind"] for x in runs]
    assert kinds[-1] == "progress" and kinds.count("progress-run") == len(kinds) - 1
    by = {(x["summary"]["recipe"], x["summary"]["n_train"], x["summary"]["passes"]): x for x in runs[:-1]}
    for p in rows["rung5"]["compute_points"]:  # the table's numbers are the stored runs'
        f = by[("rung5", pg.SMOKE_N, p["passes"])]["summary"]
        assert p["test_error"] == pytest.approx(f["test_error"])
    assert (tmp_path / "progress" / "compute_curves.png").stat().st_size > 1000
    import importlib.util  # docs/progress.md's block is written from this record
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("readme_tables", Path(__file__).parents[1] / "scripts/readme_tables.py")
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    text = rt.render_progress(runs[-1])
    assert f"| rung5 | 8 | {rows['rung5']['test_error']:.2f}% +- {rows['rung5']['test_error_std']:.2f} |" in text
    assert f"| algorithm | {s['decomposition']['algorithm']['points']:.2f} [" in text
    page = tmp_path / "p.md"
    page.write_text("a\n<!-- progress:begin -->\nold\n<!-- progress:end -->\nb\n")
    assert rt.main(["--store", str(tmp_path), "--progress", "--readme", str(page), "--check"]) == 1
    assert rt.main(["--store", str(tmp_path), "--progress", "--readme", str(page)]) == 0
    assert "old" not in page.read_text() and text in page.read_text()
