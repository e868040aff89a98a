"""The overfitting form of the scaling fit (a penalty G epochs^omega on top of the repeated-data
form), the choice of a form on a validation fold of the fitted cells, and the extrapolation
check with seeds as the unit (`scale fit DIR --by-seed`)."""
import json
import math

import numpy as np
import pytest

from backproplab.errors import UserError
from backproplab.scaling import as_runs, extrapolation_check, fit_chinchilla, repeats, synthetic_runs
from backproplab.scaling.fit import choose_form, fit_overfit, overfit_objective
from backproplab.store import add_run

TINY_GRID = {"alpha": (0.5,), "beta": (0.5,), "e": (0.0,), "a": (5.0, 10.0), "b": (5.0, 10.0)}
# Digit-study-like truth: losses 0.1-2 nats, nets of 2k-80k weights, 0.25 to 8 passes over 3,000.
TRUTH = {"E": 0.1, "A": 80.0, "B": 160.0, "alpha": 0.9, "beta": 0.8, "R_star": 2.0}
PENALTY = {"G": 0.01, "omega": 1.2}
GRID = {"N_range": (2e3, 8e4), "D_range": (750.0, 24000.0), "n_N": 5, "n_D": 6, "n_train": 3000}


def _runs(noise=0.0, seed=1, penalty=True):
    return synthetic_runs(**TRUTH, **(PENALTY if penalty else {}), noise=noise, seed=seed, **GRID)


def test_overfit_objective_and_gradient_match_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    N, D, U = 10 ** rng.uniform(3, 5, 40), 10 ** rng.uniform(3, 5, 40), 10 ** rng.uniform(3, 4, 40)
    Us, reps = repeats(D, U)
    L = np.exp(rng.normal(-1.2, 0.3, 40))
    for delta in (1e-3, 10.0):                            # linear and quadratic Huber parts
        th = np.array([4.0, 5.0, -2.0, 0.9, 0.8, math.log(2.0), -4.0, 1.5])
        f, g = overfit_objective(th, np.log(N), np.log(Us), np.log(L), delta, reps, np.log(D / U))
        t = torch.tensor(th, dtype=torch.float64, requires_grad=True)
        x = torch.tensor
        De = x(Us) * (1 + torch.exp(t[5]) * (1 - torch.exp(-x(reps) / torch.exp(t[5]))))
        pred = torch.log(torch.exp(t[2]) + torch.exp(t[0]) / x(N) ** t[3] + torch.exp(t[1]) / De ** t[4]
                         + torch.exp(t[6]) * x(D / U) ** t[7])
        ref = torch.nn.functional.huber_loss(pred, x(np.log(L)), reduction="sum", delta=delta)
        ref.backward()
        assert f == pytest.approx(ref.item(), rel=1e-10)
        assert np.allclose(g, t.grad.numpy(), rtol=1e-8, atol=1e-12)
        assert abs(g[6]) > 1e-6 and abs(g[7]) > 1e-6     # the penalty's directions are live


def test_synthetic_penalty_is_g_times_epochs_to_the_omega():
    with_p, without = _runs(penalty=True), _runs(penalty=False)
    assert np.allclose(with_p.loss - without.loss, PENALTY["G"] * with_p.epochs ** PENALTY["omega"], rtol=1e-12)
    assert with_p.info["truth"]["omega"] == PENALTY["omega"]
    with pytest.raises(ValueError):
        synthetic_runs(G=0.01, noise=0.0)                 # a penalty needs omega and R_star


def test_overfit_fit_recovers_the_planted_penalty_and_the_repeated_form_cannot():
    r = _runs(noise=0.0)
    # The planted loss turns up with passes at the largest net: the repeated-data form cannot do that.
    big = r.N == r.N.max()
    assert r.loss[big][np.argmax(r.epochs[big])] > r.loss[big][np.argsort(r.epochs[big])[-2]]
    fit = fit_overfit(r.N, r.D, r.loss, r.U, n_boot=0, grid=TINY_GRID)
    assert len(fit.theta) == 8 and fit.repeated
    for k, v in {**TRUTH, **PENALTY}.items():
        assert fit.params[k] == pytest.approx(v, rel=5e-3), (k, fit.params)
    assert np.allclose(fit.predict(r.N, r.D, U=r.U), r.loss, rtol=1e-4)
    rep = fit_chinchilla(r.N, r.D, r.loss, n_boot=0, grid=TINY_GRID, U=r.U)
    assert np.abs(rep.predict(r.N, r.D, U=r.U) / r.loss - 1).max() > 0.05
    d = fit.to_dict()
    assert "G epochs^omega" in d["form"] and set(PENALTY) <= set(d["constants"])
    # Without a training-set size there are no repeats and no penalty: the plain form's value.
    th = fit.theta
    plain = th[2], th[0], th[1], th[3], th[4]
    N0, D0 = 5e3, 2e4
    assert fit.predict(N0, D0) == pytest.approx(math.exp(plain[0]) + math.exp(plain[1]) / N0 ** plain[3]
                                                + math.exp(plain[2]) / D0 ** plain[4], rel=1e-12)


def test_overfit_fit_at_noise_has_intervals_covering_the_penalty():
    r = _runs(noise=0.005, seed=2)
    fit = fit_overfit(r.N, r.D, r.loss, r.U, n_boot=30, seed=0, grid=TINY_GRID)
    ci = fit.intervals()
    for k, v in PENALTY.items():
        assert ci[k][0] <= v <= ci[k][1], (k, ci[k])
    assert ci["omega"][0] > 0.3                          # a penalty that grows with passes is resolved


def test_the_form_is_chosen_on_the_fitted_cells_alone():
    r = _runs(noise=0.002, seed=3)
    ex = extrapolation_check(r, 0.1, n_boot=0, grid=TINY_GRID)
    assert set(ex["form_choice"]["forms"]) == {"chinchilla", "chinchilla_repeated", "chinchilla_overfit"}
    assert ex["form_choice"]["chosen"] == "chinchilla_overfit"
    assert ex["chinchilla_overfit"]["mean_abs_rel_err"] < ex["chinchilla_repeated"]["mean_abs_rel_err"]
    # Wreck the held-out cells' losses: the choice (and its fold errors) do not move.
    cells = as_runs(r)
    ho = np.argsort(cells.C, kind="stable")[-ex["n_holdout"]:]
    loss = cells.loss.copy()
    loss[ho] *= 3.0
    ex2 = extrapolation_check(as_runs({**{f: getattr(cells, f) for f in ("N", "D", "C", "lr", "epochs", "U")},
                                       "loss": loss, "family": cells.family}), 0.1, n_boot=0, grid=TINY_GRID)
    assert ex2["form_choice"] == ex["form_choice"]
    assert ex2["chinchilla_overfit"]["mean_abs_rel_err"] > 0.5
    # The fold is the fitted cells' own top by compute.
    fc = choose_form(cells.N, cells.D, cells.C, cells.loss, cells.U, ["chinchilla"], frac=0.2, grid=TINY_GRID)
    assert fc["n_validation"] == 6 and fc["n_fit"] == 24 and fc["chosen"] == "chinchilla"


# -- seeds as the unit -----------------------------------------------------------------------
SEED_SCALE = (1.0, 1.06, 0.95)                           # seed k's losses are the law's times this


def _seed_store(tmp_path, n_seeds=3, partial=False):
    """partial: the rates swept on seed 0 alone (scale run's default), the others at the chosen one."""
    law = _runs(noise=0.0, penalty=False)
    rng = np.random.default_rng(0)
    jitter = np.exp(0.01 * rng.standard_normal((n_seeds, len(law))))
    per_seed = np.array(SEED_SCALE[:n_seeds])[:, None] * jitter * law.loss[None]      # (seeds, cells)
    for i, rec in enumerate(law.records()):
        seeds = [float(v) for v in per_seed[:, i]]
        summ = {"N": rec["N"], "D": rec["D"], "C": rec["C"], "loss": float(np.mean(seeds)), "epochs": rec["epochs"],
                "n_train": rec["U"], "family": "convnet", "val_loss_seeds": seeds,
                "sweep": [{"lr": 0.05, "val_loss": float(np.mean(seeds)), "val_loss_seeds": seeds, "status": "finished"},
                          {"lr": 0.1, "val_loss": 2 * float(np.mean(seeds)), "val_loss_seeds": [2 * v for v in seeds],
                           "status": "finished"}]}
        if partial:
            summ.update(lr=0.05, val_loss=summ["loss"], seeds=list(range(n_seeds)), sweep_seeds=[0])
            summ["sweep"] = [{"lr": 0.05, "val_loss": seeds[0], "val_loss_seeds": seeds[:1], "status": "finished"},
                             {"lr": 0.1, "val_loss": 2 * seeds[0], "val_loss_seeds": [2 * seeds[0]],
                              "status": "finished"}]
        add_run(tmp_path, "scale", f"cell{i}", "finished",
                {"family": "convnet", "split": "val=last n_val", "n_val": 100}, summ, [], {})
    return law, per_seed


def test_by_seed_fits_each_seed_and_every_resample(tmp_path):
    from backproplab.scaling.fitcmd import _seed_counts, by_seed_lines, heldout_by_seed
    counts = list(_seed_counts(3))                      # the exact bootstrap over 3 seeds: 10 resamples
    assert len(counts) == 10 and sum(p for _, p in counts) == pytest.approx(1.0)
    assert dict(counts)[(1, 1, 1)] == pytest.approx(6 / 27) and dict(counts)[(3, 0, 0)] == pytest.approx(1 / 27)
    law, per_seed = _seed_store(tmp_path, n_seeds=2)    # 2 seeds (3 resamples) keep the test fast
    b = heldout_by_seed(tmp_path / "runs.db", grid=TINY_GRID)
    json.dumps(b, allow_nan=False)
    f = b["families"]["convnet"]
    assert b["n_seeds"] == 2 and b["n_resamples"] == 3 and f["n_holdout"] == 3
    # Oracle: seed k's fit is the extrapolation check on seed k's own cells.
    for k in range(2):
        own = as_runs({**{c: getattr(law, c) for c in ("N", "D", "C", "epochs", "U")}, "loss": per_seed[k],
                       "family": "convnet"})
        ex = extrapolation_check(own, 0.1, n_boot=0, grid=TINY_GRID)
        for form in ("chinchilla", "chinchilla_repeated"):
            assert f["forms"][form]["mean_abs_rel_err"]["per_seed"][k] == pytest.approx(
                ex[form]["mean_abs_rel_err"], rel=1e-6), (k, form)
    m = f["forms"]["chinchilla_repeated"]["mean_abs_rel_err"]
    assert m["per_seed_mean"] == pytest.approx(np.mean(m["per_seed"]))
    lo, hi = m["bootstrap_ci"]
    assert lo <= m["seed_mean_fit"] <= hi and m["per_seed_t_ci"][0] < m["per_seed_mean"] < m["per_seed_t_ci"][1]
    assert f["chosen_form"]["seed_mean_fit"] in f["forms"]
    text = "\n".join(by_seed_lines(b))
    assert "seeds as the unit" in text and "repeated data" in text and "chosen on validation" in text
    # The same study with its rates swept on seed 0 alone: the same fits (the chosen rate carries the seeds).
    (tmp_path / "partial").mkdir()
    _seed_store(tmp_path / "partial", n_seeds=2, partial=True)
    bp = heldout_by_seed(tmp_path / "partial" / "runs.db", grid=TINY_GRID)
    assert bp["n_seeds"] == 2 and bp["families"]["convnet"]["forms"] == f["forms"]


def test_by_seed_refuses_a_one_seed_store_in_one_line(tmp_path, capsys):
    from backproplab.cli import main
    r = _runs(noise=0.01)
    for i, rec in enumerate(r.records()):
        rec["n_train"] = rec.pop("U")
        add_run(tmp_path, "scale", f"r{i}", "finished", {"family": rec.pop("family")}, rec, [], {})
    before = (tmp_path / "runs.db").read_bytes()
    assert main(["scale", "fit", str(tmp_path), "--by-seed", "--n-boot", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --by-seed needs") and "1 seed" in err[0]
    assert (tmp_path / "runs.db").read_bytes() == before
    with pytest.raises(UserError):
        from backproplab.scaling.fitcmd import heldout_by_seed
        heldout_by_seed(tmp_path)
