"""Scaling-law fitting (issue 5): recovery of known constants, the objective against direct
formulas, frontier / IsoFLOP / learning-rate fits, the store reader's errors, the report."""
import json
import math
import sqlite3

import numpy as np
import pytest

from backproplab.errors import UserError
from backproplab.scaling import (BESIROGLU, allocation, as_runs, best_lr_table, check_synthetic,
                                 chinchilla_log_pred, chinchilla_objective, compare_frontiers,
                                 extrapolation_check, fit_chinchilla, fit_report, frontier, huber,
                                 isoflop_profiles, load_runs_from_store, log_effective_data, repeats,
                                 synthetic_runs)
from backproplab.store import add_run

# A 4-start grid for the tests that are not about the fitter's search itself.
TINY_GRID = {"alpha": (0.5,), "beta": (0.5,), "e": (0.0,), "a": (5.0, 10.0), "b": (5.0, 10.0)}


def _theta(E, A, B, alpha, beta):
    return np.array([math.log(A), math.log(B), math.log(E), alpha, beta])


def test_synthetic_recovery_inside_intervals():
    # Default truth (Besiroglu refit), default noise (sigma 0.01 on log L), 9 x 9 grid;
    # fewer bootstrap samples than the default 1000 to stay fast.
    r = check_synthetic(n_boot=60, seed=0)
    p = r["params"]
    assert abs(p["alpha"]["fit"] - BESIROGLU["alpha"]) <= 0.02
    assert abs(p["beta"]["fit"] - BESIROGLU["beta"]) <= 0.02
    assert abs(p["E"]["fit"] / BESIROGLU["E"] - 1) <= 0.02
    assert r["target_met"]
    for name in ("E", "A", "B", "alpha", "beta", "N_opt_exponent"):
        lo, hi = p[name]["ci"]
        assert lo < hi and lo <= p[name]["true"] <= hi, (name, p[name])
    # The interval is informative, not the whole line.
    assert p["alpha"]["ci"][1] - p["alpha"]["ci"][0] < 0.1


def test_huber_matches_piecewise_formula():
    d = 1e-3
    for r in (-0.5, -2e-3, -1e-3, -3e-4, 0.0, 5e-4, 1e-3, 0.02):
        want = 0.5 * r * r if abs(r) <= d else d * (abs(r) - d / 2)
        assert huber(r, d) == pytest.approx(want, rel=1e-12, abs=1e-18)


def test_fit_shrugs_off_gross_outliers_where_least_squares_does_not():
    # The Huber loss with delta = 1e-3 is what makes the fit robust: three runs of 25 with a
    # loss 0.6x to 2.5x what the law says (a run that diverged half-way, a logging slip) barely
    # move it. The same fitter with a delta beyond every residual is least squares, which
    # they drag far off, so a fit that quietly lost its Huber loss fails here.
    truth = {"E": 1.8, "A": 480.0, "B": 2100.0, "alpha": 0.35, "beta": 0.37}
    N, D = (g.ravel() for g in np.meshgrid(np.geomspace(1e7, 1e11, 5), np.geomspace(1e8, 1e12, 5), indexing="ij"))
    law = truth["E"] + truth["A"] / N ** truth["alpha"] + truth["B"] / D ** truth["beta"]
    L = law * np.exp(0.002 * np.random.default_rng(0).standard_normal(law.size))
    outliers = np.array([3, 12, 21])
    L[outliers] *= np.array([1.8, 0.6, 2.5])
    clean = np.setdiff1d(np.arange(law.size), outliers)

    robust = fit_chinchilla(N, D, L, n_boot=0, grid=TINY_GRID)        # the default delta
    p = robust.params
    assert abs(p["alpha"] - truth["alpha"]) < 0.02 and abs(p["beta"] - truth["beta"]) < 0.02, p
    for k in ("E", "A", "B"):
        assert abs(p[k] / truth[k] - 1) < 0.1, (k, p)
    assert np.abs(robust.predict(N[clean], D[clean]) / law[clean] - 1).max() < 0.01

    lsq = fit_chinchilla(N, D, L, n_boot=0, grid=TINY_GRID, delta=1e6).params
    assert abs(lsq["alpha"] - truth["alpha"]) > 0.1 or abs(lsq["beta"] - truth["beta"]) > 0.05, lsq


def test_lse_parametrization_equals_plain_formula():
    rng = np.random.default_rng(1)
    N, D = 10 ** rng.uniform(6, 11, 50), 10 ** rng.uniform(7, 12, 50)
    E, A, B, alpha, beta = 1.8, 482.0, 2085.0, 0.35, 0.37
    plain = E + A / N ** alpha + B / D ** beta
    assert np.allclose(np.exp(chinchilla_log_pred(_theta(E, A, B, alpha, beta), np.log(N), np.log(D))), plain,
                       rtol=1e-12)
    # Stable where the naive exponentials overflow: e^800 terms.
    big = np.array([800.0, 790.0, 795.0, 0.0, 0.0])
    got = chinchilla_log_pred(big, np.zeros(1), np.zeros(1))[0]
    assert got == pytest.approx(800 + math.log(1 + math.exp(-10) + math.exp(-5)), rel=1e-14)


def test_objective_is_summed_huber_of_log_residuals_and_gradient_matches():
    rng = np.random.default_rng(2)
    N, D = 10 ** rng.uniform(7, 10, 40), 10 ** rng.uniform(8, 11, 40)
    L = (1.7 + 400 / N ** 0.34 + 410 / D ** 0.28) * np.exp(0.01 * rng.standard_normal(40))
    th = _theta(1.9, 300.0, 900.0, 0.3, 0.33)
    f, g = chinchilla_objective(th, np.log(N), np.log(D), np.log(L))
    resid = np.log(1.9 + 300.0 / N ** 0.3 + 900.0 / D ** 0.33) - np.log(L)
    direct = sum(0.5 * r * r if abs(r) <= 1e-3 else 1e-3 * (abs(r) - 5e-4) for r in resid)
    assert f == pytest.approx(direct, rel=1e-10)       # a sum over runs, not a mean
    assert f > 40 * 1e-3 * 1e-3                          # residuals ~1e-2: most in the linear part
    num = np.zeros(5)
    for i in range(5):
        h = np.zeros(5)
        h[i] = 1e-6
        num[i] = (chinchilla_objective(th + h, np.log(N), np.log(D), np.log(L))[0]
                  - chinchilla_objective(th - h, np.log(N), np.log(D), np.log(L))[0]) / 2e-6
    assert np.allclose(g, num, rtol=1e-5, atol=1e-9)


def test_fit_recovers_noiseless_constants_exactly():
    r = synthetic_runs(noise=0.0, n_N=6, n_D=6, seed=0)
    fit = fit_chinchilla(r.N, r.D, r.loss, n_boot=0, grid=TINY_GRID)
    for k, v in BESIROGLU.items():
        assert fit.params[k] == pytest.approx(v, rel=2e-3), k


def test_compute_optimal_allocation_minimizes_loss_at_fixed_compute():
    th = _theta(**BESIROGLU)
    eN, eD, _ = allocation(th, k=6.0)
    s = BESIROGLU["alpha"] + BESIROGLU["beta"]
    assert eN == pytest.approx(BESIROGLU["beta"] / s) and eD == pytest.approx(BESIROGLU["alpha"] / s)
    r = synthetic_runs(noise=0.0, n_N=4, n_D=4)
    fit = fit_chinchilla(r.N, r.D, r.loss, n_boot=0, grid=TINY_GRID)
    fit.theta = th                                       # check the allocation, not the fit
    for gamma in (1.0, 1.4):                             # C = 6 N^gamma D (gamma > 1: a convnet)
        fit.gamma = gamma
        for C in (1e18, 1e21, 1e24):
            N, D, L = fit.optimal(C)
            assert 6 * N ** gamma * D == pytest.approx(C, rel=1e-9)
            for f in (0.8, 1.25):                        # move along the constant-C curve: loss goes up
                assert fit.predict(N * f, D / f ** gamma) > L
    eN, _, _ = allocation(th, k=6.0, gamma=1.4)
    assert eN == pytest.approx(BESIROGLU["beta"] / (BESIROGLU["alpha"] + 1.4 * BESIROGLU["beta"]))


def test_frontier_slope_on_exact_power_law():
    rng = np.random.default_rng(3)
    C = 10 ** rng.uniform(12, 18, 30)
    L = 3.0 * C ** -0.07
    # Dominated runs (more compute, worse loss) must not move the fit.
    C2 = np.concatenate([C, C[:10] * 1.5])
    L2 = np.concatenate([L, L[:10] * 1.3])
    fr = frontier(C2, L2, n_boot=200)
    assert fr["slope"] == pytest.approx(-0.07, abs=1e-12)
    assert fr["intercept"] == pytest.approx(math.log(3.0), abs=1e-10)
    assert len(fr["points"]) == 30
    assert fr["slope_ci"][0] == pytest.approx(-0.07, abs=1e-10) and fr["slope_ci"][1] == pytest.approx(-0.07, abs=1e-10)
    with pytest.raises(UserError, match=">= 3 runs"):
        frontier(C[:2], L[:2])


def test_isoflop_exponent_matches_chinchilla_allocation():
    r = synthetic_runs(seed=1)
    iso = isoflop_profiles(r, n_bins=16, n_boot=100)
    want = BESIROGLU["beta"] / (BESIROGLU["alpha"] + BESIROGLU["beta"])     # 0.5126
    pN, pD = iso["profiles"]["N"], iso["profiles"]["D"]
    assert pN["n_valid_bins"] >= 6
    assert pN["exponent"] == pytest.approx(want, abs=0.03)
    assert pN["exponent_ci"][0] <= want <= pN["exponent_ci"][1]
    assert pD["exponent"] == pytest.approx(1 - want, abs=0.03)
    # Default bins: one per compute level of the lattice design (C = 6 N D on a 9 x 9 grid).
    auto = isoflop_profiles(r, n_boot=0)
    assert len(auto["log_C_edges"]) == 18
    assert auto["profiles"]["N"]["exponent"] == pytest.approx(want, abs=0.03)


def test_best_lr_table_recovers_epoch_exponent():
    r = synthetic_runs(lr_sweep=True, n_N=4, n_D=6, seed=2)
    out = best_lr_table(r, n_boot=200)
    assert len(out["table"]) == 24 and all(row["n_lrs"] == 5 for row in out["table"])
    f = out["fit"]
    assert f["epochs_exponent"] == pytest.approx(-0.3, abs=0.06)     # LR_MODEL p_epochs
    assert f["epochs_exponent_ci"][0] < f["epochs_exponent"] < f["epochs_exponent_ci"][1]
    assert "N_exponent" in f
    # without bootstrap refits (scale fit --n-boot 0) the same point estimate, and no interval
    f0 = best_lr_table(r, n_boot=0)["fit"]
    assert f0["epochs_exponent"] == f["epochs_exponent"] and all(np.isnan(f0["epochs_exponent_ci"]))


def test_extrapolation_on_noiseless_data_is_exact():
    r = synthetic_runs(noise=0.0, n_N=6, n_D=6)
    ex = extrapolation_check(r, 0.15, n_boot=0, grid=TINY_GRID)
    assert ex["n_holdout"] == 6 and ex["n_fit"] == 30
    assert ex["chinchilla"]["max_abs_rel_err"] < 1e-3 and ex["chinchilla"]["within_5pct"]
    assert all(run["C"] >= ex["C_threshold"] for run in ex["chinchilla"]["runs"])


def test_too_few_runs_for_chinchilla_says_how_many():
    r = synthetic_runs(n_N=2, n_D=6)
    with pytest.raises(UserError, match=r">= 10 runs with >= 3 distinct N"):
        fit_chinchilla(r.N, r.D, r.loss, n_boot=0)


def test_compare_frontiers_detects_better_family_and_a_match():
    a = synthetic_runs(family="convnet", seed=0).records()
    b = synthetic_runs(E=1.5, family="vit", seed=1).records()
    c = synthetic_runs(family="vit", seed=2).records()
    better = compare_frontiers(as_runs(a + b), "convnet", "vit", n_boot=200)
    assert better["verdict"].startswith("vit reaches lower loss")
    assert better["loss_ratio_ci"][1][1] < 1
    same = compare_frontiers(as_runs(a + c), "convnet", "vit", n_boot=200)
    assert "match" in same["verdict"], same


# ---- the store reader ----

def _scale_summary(N, D, loss, lr=0.1, epochs=1.0):
    return {"N": N, "D": D, "C": 6.0 * N * D, "loss": loss, "lr": lr, "epochs": epochs, "family": "convnet"}


def test_load_missing_file(tmp_path):
    with pytest.raises(UserError, match="no results store"):
        load_runs_from_store(tmp_path / "nope.db")


def test_load_not_sqlite(tmp_path):
    p = tmp_path / "runs.db"
    p.write_text("this is not a database\n" * 100)
    with pytest.raises(UserError, match="not an SQLite results store"):
        load_runs_from_store(p)


def test_load_foreign_sqlite_is_refused_and_left_untouched(tmp_path):
    p = tmp_path / "other.db"
    con = sqlite3.connect(p)
    con.execute("CREATE TABLE users (id INTEGER, name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(UserError, match="not a backproplab results store"):
        load_runs_from_store(p)
    con = sqlite3.connect(p)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    con.close()
    assert tables == {"users"}                           # no runs table created in it


def test_load_too_few_runs_and_no_scale_runs(tmp_path):
    add_run(tmp_path, "ladder", "x", "finished", {}, {"test_error": 1.0}, [], {})
    with pytest.raises(UserError, match="no scale runs"):
        load_runs_from_store(tmp_path / "runs.db")
    add_run(tmp_path, "scale", "a", "finished", {}, _scale_summary(1e4, 1e5, 1.0), [], {})
    add_run(tmp_path, "scale", "b", "finished", {}, _scale_summary(2e4, 1e5, 0.9), [], {})
    add_run(tmp_path, "scale", "c", "diverged", {}, _scale_summary(4e4, 1e5, float("nan")), [], {})
    with pytest.raises(UserError) as e:
        load_runs_from_store(tmp_path)
    msg = str(e.value)
    assert "2 usable scale runs" in msg and "1 diverged" in msg
    assert ">= 3 runs" in msg and ">= 10 runs" in msg and "\n" not in msg
    add_run(tmp_path, "scale", "d", "finished", {}, _scale_summary(4e4, 1e5, 0.8), [], {})
    assert len(load_runs_from_store(tmp_path)) == 3                  # enough for a frontier ...
    with pytest.raises(UserError, match="needs >= 10 runs with >= 3 distinct N and >= 3 distinct D; got 3 runs"):
        load_runs_from_store(tmp_path, require_chinchilla=True)      # ... not for the Chinchilla form


def test_load_reads_scale_runs(tmp_path):
    r = synthetic_runs(n_N=3, n_D=4, seed=0)
    for i, rec in enumerate(r.records()):
        add_run(tmp_path, "scale", f"r{i}", "finished", {"family": rec.pop("family")}, rec, [], {})
    add_run(tmp_path, "datascale", "other", "finished", {}, {"test_error": 3.0}, [], {})
    runs = load_runs_from_store(tmp_path / "runs.db")
    assert len(runs) == 12 and runs.families() == ["synthetic"]        # family taken from the config
    assert np.allclose(np.sort(runs.loss), np.sort(r.loss))


def test_fit_report_is_json_and_writes_plots(tmp_path):
    a = synthetic_runs(n_N=5, n_D=5, lr_sweep=True, family="convnet", seed=0)
    rep = fit_report(a, tmp_path, n_boot=20, grid=TINY_GRID)
    json.dumps(rep, allow_nan=False)
    conv = rep["fits"]["convnet"]
    assert conv["n_runs"] == 125 and conv["n_cells"] == 25
    assert conv["chinchilla"]["constants"]["alpha"] > 0
    assert conv["flops_model"]["k"] == pytest.approx(6.0) and conv["flops_model"]["gamma"] == pytest.approx(1.0)
    assert conv["lr"]["fit"]["epochs_exponent"] < 0
    assert conv["extrapolation"]["n_holdout"] == 3
    assert set(rep["plots"]) == {"frontier", "isoflop", "chinchilla", "lr"}
    for path in rep["plots"].values():
        assert path.endswith(".png") and (tmp_path / path.split("/")[-1]).stat().st_size > 1000


def test_fit_report_per_family_with_comparison(tmp_path):
    a = synthetic_runs(n_N=4, n_D=4, family="convnet", seed=0)
    b = synthetic_runs(n_N=4, n_D=4, E=1.5, family="vit", seed=1)
    c = synthetic_runs(n_N=2, n_D=2, family="mlp", seed=2)
    rep = fit_report(as_runs(a.records() + b.records() + c.records()), tmp_path, n_boot=20, grid=TINY_GRID,
                     plots=False)
    json.dumps(rep, allow_nan=False)
    assert rep["families"] == ["convnet", "mlp", "vit"]
    assert "constants" in rep["fits"]["vit"]["chinchilla"]
    assert ">= 10 runs" in rep["fits"]["mlp"]["chinchilla"]["why_no_fit"]   # 4 runs: frontier only
    assert rep["fits"]["vit"]["lr"]["fit"].get("why_no_fit")               # one lr per cell: no lr fit
    assert len(rep["comparisons"]) == 3 and not rep["plots"]


# -- repeated data: D replaced by D_eff = U_s (1 + R* (1 - exp(-R/R*))) ------------------------
def _repeated_runs(noise, seed=0, n=6, R_star=3.0):
    # U = 3e9: from 0.03 to 333 epochs over the D grid, so fresh and saturated data both occur.
    return synthetic_runs(noise=noise, n_N=n, n_D=n, n_train=3e9, R_star=R_star, seed=seed)


def test_effective_data_against_the_formula_and_its_limits():
    D = np.array([5e3, 1e4, 2e4, 8e4, 1e6])
    U = np.full(5, 1e4)
    Us, reps = repeats(D, U)
    assert np.allclose(Us, [5e3, 1e4, 1e4, 1e4, 1e4]) and np.allclose(reps, [0, 0, 1, 7, 99])
    logDe, _ = log_effective_data(np.log(Us), reps, math.log(2.0))
    assert np.allclose(np.exp(logDe), Us * (1 + 2.0 * (1 - np.exp(-reps / 2.0))), rtol=1e-12)
    assert np.exp(logDe[-1]) == pytest.approx(3 * 1e4, rel=1e-9)        # saturates at U (1 + R*)
    fresh, _ = log_effective_data(np.log(Us), reps, math.log(1e9))      # R* -> inf: repeats as good as new
    assert np.allclose(np.exp(fresh), D, rtol=1e-6)
    # Without repeats the 6-parameter form predicts what the 5-parameter one does.
    th = _theta(**BESIROGLU)
    logN = np.log(np.geomspace(1e7, 1e10, 5))
    assert np.allclose(chinchilla_log_pred(np.append(th, 0.7), logN, np.log(D[:2].repeat(3)[:5]), np.zeros(5)),
                       chinchilla_log_pred(th, logN, np.log(D[:2].repeat(3)[:5])), rtol=1e-14)


def test_repeated_objective_gradient_matches_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    N, D, U = 10 ** rng.uniform(7, 10, 40), 10 ** rng.uniform(8, 11, 40), 10 ** rng.uniform(8, 10, 40)
    Us, reps = repeats(D, U)
    L = np.exp(rng.normal(0.8, 0.3, 40))
    for delta in (1e-3, 10.0):                            # linear and quadratic Huber parts
        th = np.array([5.0, 6.0, 0.4, 0.35, 0.3, math.log(4.0)])
        f, g = chinchilla_objective(th, np.log(N), np.log(Us), np.log(L), delta, reps)
        t = torch.tensor(th, dtype=torch.float64, requires_grad=True)
        x = torch.tensor
        De = x(Us) * (1 + torch.exp(t[5]) * (1 - torch.exp(-x(reps) / torch.exp(t[5]))))
        pred = torch.log(torch.exp(t[2]) + torch.exp(t[0]) / x(N) ** t[3] + torch.exp(t[1]) / De ** t[4])
        ref = torch.nn.functional.huber_loss(pred, x(np.log(L)), reduction="sum", delta=delta)
        ref.backward()
        assert f == pytest.approx(ref.item(), rel=1e-10)
        assert np.allclose(g, t.grad.numpy(), rtol=1e-8, atol=1e-12)
        assert abs(g[5]) > 1e-6                           # the R* direction is live on these runs


def test_repeated_fit_recovers_constants_and_plain_form_cannot():
    r = _repeated_runs(noise=0.0)
    assert r.repeats_data()
    fit = fit_chinchilla(r.N, r.D, r.loss, n_boot=0, grid=TINY_GRID, U=r.U)
    assert fit.repeated and len(fit.theta) == 6
    for k, v in {**BESIROGLU, "R_star": 3.0}.items():
        assert fit.params[k] == pytest.approx(v, rel=2e-3), k
    assert np.allclose(fit.predict(r.N, r.D, U=r.U), r.loss, rtol=1e-4)
    plain = fit_chinchilla(r.N, r.D, r.loss, n_boot=0, grid=TINY_GRID)
    assert np.abs(plain.predict(r.N, r.D) / r.loss - 1).max() > 0.02   # L(N, D) cannot express repeats


def test_repeated_fit_at_noise_has_intervals_covering_the_truth():
    r = _repeated_runs(noise=0.01, seed=1, n=7)
    fit = fit_chinchilla(r.N, r.D, r.loss, n_boot=40, seed=0, grid=TINY_GRID, U=r.U)
    ci = fit.intervals()
    for k, v in {**BESIROGLU, "R_star": 3.0}.items():
        assert ci[k][0] <= v <= ci[k][1], (k, ci[k])
    assert ci["R_star"][1] / ci["R_star"][0] < 10    # informative: the bounds allow a ratio of 1e6
    d = fit.to_dict()
    assert "R_star" in d["constants"] and "D_eff" in d["form"]


def test_extrapolation_reports_both_forms_on_repeated_data():
    r = _repeated_runs(noise=0.0)
    ex = extrapolation_check(r, 0.15, n_boot=0, grid=TINY_GRID)
    assert ex["chinchilla_repeated"]["max_abs_rel_err"] < 1e-3
    assert ex["chinchilla"]["max_abs_rel_err"] > 0.01
    assert [q["D"] for q in ex["chinchilla_repeated"]["runs"]] == [q["D"] for q in ex["chinchilla"]["runs"]]
    # Runs without U (or without repeats) get the plain form only.
    assert "chinchilla_repeated" not in extrapolation_check(synthetic_runs(noise=0.0, n_N=6, n_D=6), 0.15,
                                                             n_boot=0, grid=TINY_GRID)


def test_store_reader_takes_the_training_set_size(tmp_path):
    r = _repeated_runs(noise=0.01, n=4)
    for i, rec in enumerate(r.records()):
        rec["n_train"] = rec.pop("U")
        add_run(tmp_path, "scale", f"r{i}", "finished", {"family": rec.pop("family")}, rec, [], {})
    runs = load_runs_from_store(tmp_path / "runs.db")
    assert np.allclose(runs.U, 3e9) and runs.repeats_data()
    assert not as_runs(synthetic_runs(n_N=3, n_D=4)).repeats_data()  # U unknown


def test_store_reader_averages_a_cells_seeds(tmp_path):
    r = synthetic_runs(n_N=3, n_D=4, seed=0)
    for seed, scale in ((0, 1.0), (1, 1.2), (2, 0.5)):       # three seeds of every run, one lacks a run
        for i, rec in enumerate(r.records()):
            if seed == 2 and i == 0:
                continue
            rec["loss"] *= scale
            add_run(tmp_path, "scale", f"s{seed}r{i}", "finished", {"family": rec.pop("family"), "seed": seed},
                    rec, [], {})
    runs = load_runs_from_store(tmp_path / "runs.db")
    assert len(runs) == 12 and runs.info["seeds"] == {3: 11, 2: 1}
    order = np.lexsort((runs.D, runs.N))
    want = r.loss[np.lexsort((r.D, r.N))] * np.array([2.2 / 2] + [2.7 / 3] * 11)
    assert np.allclose(runs.loss[order], want, rtol=1e-12)


def test_fit_summary_and_text_show_the_repeated_data_form(tmp_path):
    from backproplab.scaling.fitcmd import fit_text, summarize
    rep = fit_report(_repeated_runs(noise=0.0), tmp_path, n_boot=10, grid=TINY_GRID, plots=False)
    s = summarize(rep)
    json.dumps(s, allow_nan=False)
    fam = s["families"]["synthetic"]
    assert fam["chinchilla_repeated"]["constants"]["R_star"] == pytest.approx(3.0, rel=1e-2)
    assert "D_eff" in fam["chinchilla_repeated"]["form"]
    text = fit_text({**s, "seeds_per_run": {"1": 36}})
    assert "repeated data  L = E + A/N^alpha + B/D_eff^beta" in text and "R_star" in text
    assert "repeated data: mean |error|" in text and "repeated-data form" in text
