"""Runs generated from known constants, to check that the fitter recovers them.

Default truth: the Besiroglu et al. 2024 refit of Chinchilla (reference/figures.md). The
default grid is Chinchilla-like, in its own units (parameters and tokens, not rescaled):
9 model sizes N from 1e7 to 1e11 x 9 data sizes D from 1e8 to 1e12, log-spaced
(81 runs, factor ~3.2 apart), C = 6 N D. Over that range both reducible terms fall from
above E to about a tenth of it, so E, alpha and beta are all identifiable.

Default noise: multiplicative log-normal, sigma 0.01 on log L (1% loss scatter, about
what seed-to-seed variation gives on a digit classifier's validation loss).
"""
import time

import numpy as np

from .fit import fit_chinchilla, log_effective_data, repeats
from .profiles import isoflop_profiles
from .report import jsonable
from .runs import Runs

BESIROGLU = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
DEFAULT_NOISE = 0.01
# A learning-rate model for sweeps (shape as seed 002 describes: ~1.6 at small budgets,
# falling with epochs and size): lr*(N, epochs) = lr0 * epochs^p_epochs * (N / N_min)^p_N,
# log L grows by curvature * ln(lr / lr*)^2 away from it. Swept on the absolute grid 2^j.
LR_MODEL = {"lr0": 1.6, "p_epochs": -0.3, "p_N": -0.1, "curvature": 0.05, "width": 2}


def synthetic_runs(E=BESIROGLU["E"], A=BESIROGLU["A"], B=BESIROGLU["B"], alpha=BESIROGLU["alpha"],
                   beta=BESIROGLU["beta"], *, noise=DEFAULT_NOISE, N_range=(1e7, 1e11), D_range=(1e8, 1e12),
                   n_N=9, n_D=9, k=6.0, n_train=None, lr_sweep=False, lr_model=None, family="synthetic",
                   R_star=None, G=None, omega=None, seed=0) -> Runs:
    """One run per (N, D) grid point with L = (E + A/N^alpha + B/D^beta) * exp(noise * z).

    n_train: the training-set size, so epochs = D / n_train (default D_range[0] / 0.25:
    epochs from 0.25 up). lr_sweep: each cell becomes 2 * width + 1 runs on the grid 2^j
    around lr* of LR_MODEL (each with its own noise); otherwise one run at lr*.
    R_star: the repeated-data law instead (D replaced by D_eff with U = n_train, see
    fit.py); only then do the runs record U, so plain runs are fitted by the plain form.
    G, omega (with R_star): the overfitting law, a penalty G * epochs^omega added to the loss
    (written here from the formula, apart from fit.py's log-sum-exp, so the two check each other).
    """
    if (G is None) != (omega is None) or (G is not None and R_star is None):
        raise ValueError("the overfitting penalty needs G, omega and R_star together")
    rng = np.random.default_rng(seed)
    Ng, Dg = np.meshgrid(np.geomspace(*N_range, n_N), np.geomspace(*D_range, n_D), indexing="ij")
    N, D = Ng.ravel(), Dg.ravel()
    n_train = D_range[0] / 0.25 if n_train is None else float(n_train)
    epochs = D / n_train
    m = {**LR_MODEL, **(lr_model or {})}
    lr_star = m["lr0"] * epochs ** m["p_epochs"] * (N / N_range[0]) ** m["p_N"]
    if lr_sweep:
        centre = np.round(np.log2(lr_star))
        j = np.arange(-m["width"], m["width"] + 1)
        lr = 2.0 ** (centre[:, None] + j[None, :])                     # (cells, lrs)
        rep = lambda x: np.repeat(x, lr.shape[1])                        # noqa: E731
        N, D, epochs, lr_star, lr = rep(N), rep(D), rep(epochs), rep(lr_star), lr.ravel()
    else:
        lr = lr_star
    if R_star is None:
        L = E + A / N ** alpha + B / D ** beta
        U = None
    else:
        U = np.full(len(D), n_train)
        Us, reps = repeats(D, U)
        L = E + A / N ** alpha + B / np.exp(log_effective_data(np.log(Us), reps, np.log(R_star))[0]) ** beta
        if G is not None:
            L = L + G * epochs ** omega
    L = L * np.exp(m["curvature"] * np.log(lr / lr_star) ** 2 + noise * rng.standard_normal(L.size))
    return Runs(N=N, D=D, C=k * N * D, loss=L, lr=lr, epochs=epochs, U=U,
                family=np.array([family] * len(L), dtype=object),
                info={"source": "synthetic", "truth": {"E": E, "A": A, "B": B, "alpha": alpha, "beta": beta,
                                                       **({} if R_star is None else {"R_star": R_star}),
                                                       **({} if G is None else {"G": G, "omega": omega})},
                      "noise_sigma_log": noise, "seed": seed})


def check_synthetic(truth=None, *, noise=DEFAULT_NOISE, n_boot=1000, seed=0, grid="coarse", **grid_kw) -> dict:
    """Fit runs made from `truth` (default BESIROGLU) and report recovered vs true values,
    each with its 95% interval and whether the truth lies inside it, against the issue-5
    target (|alpha error|, |beta error| <= 0.02 and |E error| <= 2%)."""
    truth = dict(BESIROGLU if truth is None else truth)
    runs = synthetic_runs(**truth, noise=noise, seed=seed, **grid_kw)
    t0 = time.perf_counter()
    fit = fit_chinchilla(runs.N, runs.D, runs.loss, n_boot=n_boot, seed=seed, grid=grid)
    seconds = time.perf_counter() - t0
    got, ci = fit.params, fit.intervals()
    den = truth["alpha"] + truth["beta"]
    truth_all = {**truth, "N_opt_exponent": truth["beta"] / den, "D_opt_exponent": truth["alpha"] / den}
    got_all = {**got, **{k: fit.to_dict()["compute_optimal"][k] for k in ("N_opt_exponent", "D_opt_exponent")}}
    rows = {}
    for name, true in truth_all.items():
        lo, hi = ci.get(name, [np.nan, np.nan])
        rows[name] = {"true": true, "fit": got_all[name], "ci": [lo, hi],
                      "inside": bool(lo <= true <= hi)}
    # Cross-check by another method: the IsoFLOP (approach 2) exponent of N_opt.
    iso = isoflop_profiles(runs, n_boot=n_boot, seed=seed)["profiles"]["N"]
    lo, hi = iso["exponent_ci"]
    iso_row = {"true": truth_all["N_opt_exponent"], "fit": iso["exponent"], "ci": [lo, hi],
               "inside": bool(lo <= truth_all["N_opt_exponent"] <= hi)}
    err = {"alpha_abs": abs(got["alpha"] - truth["alpha"]), "beta_abs": abs(got["beta"] - truth["beta"]),
           "E_rel": abs(got["E"] / truth["E"] - 1)}
    grid_used = {"N_range": grid_kw.get("N_range", (1e7, 1e11)), "D_range": grid_kw.get("D_range", (1e8, 1e12)),
                 "n_N": grid_kw.get("n_N", 9), "n_D": grid_kw.get("n_D", 9)}
    return jsonable({
        "params": rows, "errors": err,
        "target_met": bool(err["alpha_abs"] <= 0.02 and err["beta_abs"] <= 0.02 and err["E_rel"] <= 0.02),
        "all_inside": bool(all(r["inside"] for r in rows.values())), "isoflop_N_opt_exponent": iso_row,
        "noise_sigma_log": noise, "n_runs": len(runs), "n_boot": n_boot, "seed": seed, "fit_seconds": seconds,
        "grid": grid_used})
