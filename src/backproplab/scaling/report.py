"""Everything the data allows, as one JSON-able summary: frontier, Chinchilla constants and
compute-optimal allocation, IsoFLOP exponents, best learning rates, the extrapolation
check, the convnet-vs-ViT frontier comparison (seed 002), and PNG plots."""
import math
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from .fit import (MIN_FRONTIER_RUNS, _percentile_ci, chinchilla_problem, choose_form, fit_chinchilla, fit_form,
                  fit_overfit, frontier, frontier_boot, frontier_indices, frontier_predict, overfit_problem)
from .profiles import best_lr_table, isoflop_profiles
from .runs import as_runs, best_per_cell


def jsonable(x):
    """numpy -> python, non-finite floats -> None, tuples -> lists, paths -> str."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


def flops_model(runs) -> dict:
    """C = k N^gamma D fitted to the runs (least squares on logs). Transformers: gamma = 1,
    k = 6. A convnet's k is far above 6 (each weight is used at every spatial position) and
    drifts with its shape as it grows, which gamma != 1 absorbs."""
    runs = as_runs(runs)
    y, x = np.log(runs.C / runs.D), np.log(runs.N)
    if len(np.unique(x)) < 2:
        k, gamma = float(np.exp(np.median(y - x))), 1.0
    else:
        gamma, logk = np.polyfit(x, y, 1)
        k, gamma = float(np.exp(logk)), float(gamma)
    dev = np.exp(y - (np.log(k) + gamma * x)) - 1
    return {"k": k, "gamma": gamma, "max_rel_dev": float(np.abs(dev).max()),
            "formula": "C = k * N^gamma * D"}


def extrapolation_check(runs, holdout_frac=0.1, *, n_boot=200, seed=0, grid="coarse", k=6.0, gamma=1.0) -> dict:
    """Fit on all but the largest-compute runs (the top holdout_frac by C, at least one),
    predict the held-out losses, report relative errors (pred / actual - 1). Chinchilla:
    every held-out run, with a bootstrap 95% prediction interval (and the same for the
    repeated-data form when the runs repeat data); frontier: the held-out runs that lie on
    the full-data envelope."""
    cells = best_per_cell(as_runs(runs))
    R = len(cells)
    n_hold = max(1, int(math.ceil(holdout_frac * R)))
    if R - n_hold < MIN_FRONTIER_RUNS:
        raise UserError(f"too few runs for an extrapolation check: {R} cells, {n_hold} held out; "
                        f"the frontier needs >= {MIN_FRONTIER_RUNS} to fit on")
    order = np.argsort(cells.C, kind="stable")
    tr, ho = order[:R - n_hold], order[R - n_hold:]
    out = {"holdout_frac": holdout_frac, "n_fit": int(len(tr)), "n_holdout": int(n_hold),
           "C_threshold": float(cells.C[ho].min())}
    why = chinchilla_problem(cells.N[tr], cells.D[tr])
    forms = [("chinchilla", None)]
    if cells.take(tr).repeats_data():          # the repeated-data form too, when the fit part repeats data
        forms.append(("chinchilla_repeated", cells.U))
        if overfit_problem(cells.D[tr], cells.U[tr]) is None:     # and the overfitting form (fit.py)
            forms.append(("chinchilla_overfit", cells.U))
    for name, U in forms:
        if why:
            out[name] = {"why_no_fit": why}
            continue
        fit = fit_form(name, cells.N[tr], cells.D[tr], cells.loss[tr], None if U is None else U[tr],
                       n_boot=n_boot, seed=seed, grid=grid, k=k, gamma=gamma)
        Uh = None if U is None else U[ho]
        pred = fit.predict(cells.N[ho], cells.D[ho], U=Uh)
        bp = np.array([fit.predict(cells.N[ho], cells.D[ho], t, U=Uh) if np.isfinite(t).all()
                       else np.full(n_hold, np.nan) for t in fit.boot]).reshape(-1, n_hold)
        ci = _percentile_ci(bp) if len(bp) else np.full((2, n_hold), np.nan)
        rel = pred / cells.loss[ho] - 1
        out[name] = {
            "constants": fit.params,
            "runs": [{"N": cells.N[i], "D": cells.D[i], "U": cells.U[i], "epochs": cells.epochs[i],
                      "C": cells.C[i], "loss": cells.loss[i], "pred": p, "pred_ci": [lo, hi], "rel_err": r}
                     for i, p, lo, hi, r in zip(ho, pred, ci[0], ci[1], rel)],
            "mean_abs_rel_err": float(np.abs(rel).mean()), "max_abs_rel_err": float(np.abs(rel).max()),
            "within_5pct": bool(np.abs(rel).max() <= 0.05)}
    if len(forms) > 1 and not why:             # which form to trust, chosen without the held-out cells
        out["form_choice"] = choose_form(cells.N[tr], cells.D[tr], cells.C[tr], cells.loss[tr], cells.U[tr],
                                         [name for name, _ in forms], frac=holdout_frac, grid=grid, k=k, gamma=gamma)
    fr = frontier(cells.C[tr], cells.loss[tr], n_boot=0)
    on_env = np.intersect1d(frontier_indices(cells.C, cells.loss), ho)
    if fr["why_no_fit"] or not len(on_env):
        out["frontier"] = {"why_no_fit": fr["why_no_fit"] or "no held-out run lies on the envelope"}
    else:
        rel = frontier_predict(fr, cells.C[on_env]) / cells.loss[on_env] - 1
        out["frontier"] = {"runs": [{"C": cells.C[i], "loss": cells.loss[i], "rel_err": r}
                                    for i, r in zip(on_env, rel)],
                           "max_abs_rel_err": float(np.abs(rel).max())}
    return jsonable(out)


def compare_frontiers(runs, fam_a, fam_b, *, n_boot=1000, seed=0) -> dict:
    """The seed-002 question: do two families reach the same loss at equal compute?

    Frontier of each family, bootstrapped independently; the loss ratio L_b / L_a of the
    fitted frontiers at the geometric middle of the overlapping compute range (and at its
    ends), with 95% intervals. 'match' when the interval of the middle ratio contains 1."""
    runs = as_runs(runs)
    ra, rb = (runs.take(np.flatnonzero(runs.family == f)) for f in (fam_a, fam_b))
    fa, fb = frontier(ra.C, ra.loss, n_boot=0), frontier(rb.C, rb.loss, n_boot=0)
    lo, hi = max(ra.C.min(), rb.C.min()), min(ra.C.max(), rb.C.max())
    overlap = bool(lo < hi)
    if not overlap:
        lo, hi = sorted((lo, hi))
    Cs = np.array([lo, math.sqrt(lo * hi), hi])
    ba = frontier_boot(ra.C, ra.loss, n_boot, seed)
    bb = frontier_boot(rb.C, rb.loss, n_boot, seed + 1)
    lc = np.log(Cs)
    ratio = np.exp((fb["intercept"] + fb["slope"] * lc) - (fa["intercept"] + fa["slope"] * lc))
    bratio = np.exp((bb[:, 1:2] + bb[:, :1] * lc) - (ba[:, 1:2] + ba[:, :1] * lc))   # (B, 3)
    ci = _percentile_ci(bratio) if n_boot else np.full((2, 3), np.nan)
    dslope = fb["slope"] - fa["slope"]
    dci = _percentile_ci(bb[:, 0] - ba[:, 0]) if n_boot else [np.nan, np.nan]
    lo_m, hi_m = ci[:, 1]
    if not np.isfinite([lo_m, hi_m]).all():
        verdict = "undetermined (a frontier could not be fitted)"
    elif lo_m <= 1 <= hi_m:
        verdict = f"{fam_a} and {fam_b} match at equal compute (loss ratio interval contains 1)"
    else:
        better = fam_a if lo_m > 1 else fam_b
        verdict = f"{better} reaches lower loss at equal compute"
    return jsonable({"families": [fam_a, fam_b], "overlap": overlap, "C": Cs,
                     "loss_ratio_b_over_a": ratio, "loss_ratio_ci": ci.T, "slope_a": fa["slope"],
                     "slope_b": fb["slope"], "slope_diff_b_minus_a": dslope, "slope_diff_ci": dci,
                     "verdict": verdict + ("" if overlap else "; compute ranges do not overlap, extrapolated")})


def _family_report(runs, out, tag, *, n_boot, seed, grid, holdout_frac, k, gamma, plots):
    from . import plots as P
    cells = best_per_cell(runs)
    rep: dict = {"n_runs": len(runs), "n_cells": len(cells)}
    fm = flops_model(cells)
    if k is not None:
        fm = {**fm, "k": float(k), "gamma": 1.0 if gamma is None else float(gamma), "given": True}
    rep["flops_model"] = fm
    t0 = time.perf_counter()
    fr = frontier(cells.C, cells.loss, n_boot=n_boot, seed=seed)
    rep["frontier"] = fr
    why = chinchilla_problem(cells.N, cells.D)
    fit = None
    if why:
        rep["chinchilla"] = {"why_no_fit": why}
    else:
        fit = fit_chinchilla(cells.N, cells.D, cells.loss, n_boot=n_boot, seed=seed, grid=grid,
                             k=fm["k"], gamma=fm["gamma"])
        rep["chinchilla"] = fit.to_dict()
        if cells.repeats_data():
            rep["chinchilla_repeated"] = fit_chinchilla(cells.N, cells.D, cells.loss, n_boot=n_boot, seed=seed,
                                                        grid=grid, k=fm["k"], gamma=fm["gamma"],
                                                        U=cells.U).to_dict()
            if overfit_problem(cells.D, cells.U) is None:
                rep["chinchilla_overfit"] = fit_overfit(cells.N, cells.D, cells.loss, cells.U, n_boot=n_boot,
                                                        seed=seed, grid=grid, k=fm["k"], gamma=fm["gamma"]).to_dict()
    iso = isoflop_profiles(cells, n_boot=n_boot, seed=seed)
    rep["isoflop"] = iso
    try:
        lr = best_lr_table(runs, n_boot=n_boot, seed=seed)
    except UserError as e:
        lr = {"table": [], "fit": {"why_no_fit": str(e)}}
    rep["lr"] = lr
    try:
        rep["extrapolation"] = extrapolation_check(cells, holdout_frac, n_boot=max(n_boot // 5, 0), seed=seed,
                                                   grid=grid, k=fm["k"], gamma=fm["gamma"])
    except UserError as e:
        rep["extrapolation"] = {"why_no_fit": str(e)}
    rep["seconds"] = time.perf_counter() - t0
    if plots:
        rep["plots"] = {
            "isoflop": P.isoflop_curves(cells, iso, out / f"scaling_isoflop{tag}.png"),
            "chinchilla": fit and P.chinchilla_contours(fit, cells, out / f"scaling_chinchilla{tag}.png"),
            "lr": lr["table"] and P.lr_vs_epochs(lr, out / f"scaling_lr{tag}.png")}
    return rep


def fit_report(runs, out_folder, *, n_boot=1000, seed=0, grid="coarse", holdout_frac=0.1, k=None, gamma=None,
               plots=True) -> dict:
    """All fits the data allows, per model family, plus the frontier comparison of every
    pair of families; plots (PNG) written into out_folder. Returns a JSON-able dict.
    k, gamma: the FLOPs model C = k N^gamma D for the compute-optimal allocation; by
    default fitted to the runs (see flops_model)."""
    from . import plots as P
    runs = as_runs(runs)
    if len(runs) < MIN_FRONTIER_RUNS:
        raise UserError(f"too few runs to fit: {len(runs)}; the frontier needs >= {MIN_FRONTIER_RUNS}")
    out = Path(out_folder)
    if plots:
        out.mkdir(parents=True, exist_ok=True)
    fams = runs.families()
    report = {"n_runs": len(runs), "families": fams, "source": runs.info.get("source"), "fits": {},
              "comparisons": [], "plots": {}}
    t0 = time.perf_counter()
    for f in fams:
        sub = runs.take(np.flatnonzero(runs.family == f))
        tag = "" if len(fams) == 1 else "_" + "".join(c if c.isalnum() else "_" for c in f)
        if len(sub) < MIN_FRONTIER_RUNS:
            report["fits"][f] = {"n_runs": len(sub), "why_no_fit": f"fewer than {MIN_FRONTIER_RUNS} runs"}
            continue
        report["fits"][f] = _family_report(sub, out, tag, n_boot=n_boot, seed=seed, grid=grid,
                                           holdout_frac=holdout_frac, k=k, gamma=gamma, plots=plots)
        report["plots"].update({f"{k2}{tag}": v for k2, v in report["fits"][f].pop("plots", {}).items() if v})
    fitted = [f for f in fams if "frontier" in report["fits"][f]]
    for i, a in enumerate(fitted):
        for b in fitted[i + 1:]:
            report["comparisons"].append(compare_frontiers(runs, a, b, n_boot=n_boot, seed=seed))
    if plots:
        fr = {f: report["fits"][f]["frontier"] for f in fitted}
        report["plots"]["frontier"] = P.loss_vs_compute(runs, fr, out / "scaling_frontier.png")
    report["seconds"] = time.perf_counter() - t0
    return jsonable(report)
