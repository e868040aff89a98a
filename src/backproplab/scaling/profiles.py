"""IsoFLOP profiles (Chinchilla approach 2) and the best learning rate per budget.

IsoFLOP: runs are grouped into log-spaced compute bins; within a bin a parabola of loss vs
log N is fitted and its vertex is N_opt(C); log N_opt vs log C is a line whose slope is the
compute-optimal exponent (beta/(alpha+beta) under the Chinchilla form with C = k N D).
The same for D and for epochs. A bin counts only if it has >= 3 distinct x values, the
parabola opens upward and its vertex lies inside the bin's x range (no extrapolation).
"""
import numpy as np

from ..errors import UserError
from .fit import _line, _percentile_ci
from .runs import as_runs, best_per_cell

MIN_BIN_POINTS = 3


def auto_edges(logC, max_levels=30, gap=0.05, max_width=0.3, fallback_bins=None):
    """IsoFLOP bin edges (log C). When the runs sit on a few distinct compute levels (a
    lattice design: clusters more than 5% apart in compute, each narrower than 35%), one
    bin per level, edges half-way; otherwise log-spaced bins, ~8 runs each (3 to 12)."""
    s = np.sort(np.asarray(logC, dtype=float))
    cut = np.flatnonzero(np.diff(s) > gap)
    starts, ends = np.concatenate([[0], cut + 1]), np.concatenate([cut, [len(s) - 1]])
    if 3 <= len(cut) + 1 <= max_levels and (s[ends] - s[starts]).max() < max_width:
        mids = (s[cut] + s[cut + 1]) / 2
        return np.concatenate([[s[0]], mids, [s[-1]]])
    n = fallback_bins or int(np.clip(len(s) // 8, 3, 12))
    return np.linspace(s[0], s[-1], n + 1)


def _bin_index(logC, edges):
    """Bin of each run for log-compute edges (n_bins + 1,), the last bin closed on the right."""
    return np.clip(np.searchsorted(edges, logC, side="right") - 1, 0, len(edges) - 2)


def _profile_core(logC, logx, L, edges, codes, n_codes, min_points=MIN_BIN_POINTS, explain=False):
    """All bins at once (it runs once per bootstrap sample): least-squares parabolas
    loss = c0 + c1 u + c2 u^2 (u = ln x) from per-bin normal equations in u centred on the
    bin mean. codes: integer code of each run's x value (for counting distinct values).
    Returns dict of (n_bins,) arrays: log C centre, log x_opt (NaN if the bin does not
    count), loss at the vertex, counts, coefs (n_bins, 3) in uncentred u, and with
    explain the reason each bin does not count."""
    nb = len(edges) - 1
    b = _bin_index(logC, edges)
    cnt = np.bincount(b, minlength=nb)
    distinct = np.bincount(np.unique(b * n_codes + codes) // n_codes, minlength=nb)
    with np.errstate(all="ignore"):
        lc = np.bincount(b, logC, minlength=nb) / cnt
        mu = np.bincount(b, logx, minlength=nb) / cnt
    v = logx - np.nan_to_num(mu)[b]
    S = [np.bincount(b, v ** k, minlength=nb) for k in range(5)]
    T = [np.bincount(b, L * v ** k, minlength=nb) for k in range(3)]
    M = np.stack([np.stack(S[0:3], -1), np.stack(S[1:4], -1), np.stack(S[2:5], -1)], axis=1)  # (nb, 3, 3)
    ok = distinct >= min_points
    c = np.full((nb, 3), np.nan)
    if ok.any():
        c[ok] = np.linalg.solve(M[ok], np.stack(T, -1)[ok][..., None])[..., 0]
    vmin, vmax = np.full(nb, np.inf), np.full(nb, -np.inf)
    np.minimum.at(vmin, b, v)
    np.maximum.at(vmax, b, v)
    with np.errstate(all="ignore"):
        vs = -c[:, 1] / (2 * c[:, 2])                      # vertex, centred
        up = c[:, 2] > 0
        inside = up & (vs >= vmin) & (vs <= vmax)
        loss_opt = c[:, 0] + c[:, 1] * vs + c[:, 2] * vs * vs
        coefs = np.stack([c[:, 0] - c[:, 1] * mu + c[:, 2] * mu * mu, c[:, 1] - 2 * c[:, 2] * mu, c[:, 2]], -1)
    why = None
    if explain:                                            # why each bin does not count ('' if it does)
        why = np.where(cnt == 0, "empty", np.where(~ok, f"< {min_points} distinct values", np.where(
            ~up, "parabola opens downward", np.where(~inside, "minimum outside the bin's range", ""))))
    return {"lc": lc, "lx": np.where(inside, vs + mu, np.nan), "loss": np.where(inside, loss_opt, np.nan),
            "n": cnt, "coefs": np.where(ok[:, None], coefs, np.nan), "why": why}


def _exponent(prof, min_bins=3):
    ok = np.isfinite(prof["lc"]) & np.isfinite(prof["lx"])
    if ok.sum() < min_bins:
        return np.nan, np.nan
    return _line(prof["lc"][ok], prof["lx"][ok])


def isoflop_profiles(runs, n_bins=None, *, n_boot=1000, seed=0, edges=None, min_points=MIN_BIN_POINTS) -> dict:
    """IsoFLOP profiles for x in N, D and epochs (when known): per-bin optima and the fit
    x_opt = exp(intercept) * C^exponent with a bootstrap 95% interval on the exponent.
    Runs are first reduced to the best learning rate per cell. Bins: `edges` (log C,
    (n_bins + 1,)) if given, else n_bins log-spaced over the compute range, else auto_edges."""
    runs = best_per_cell(as_runs(runs))
    logC, L = np.log(runs.C), runs.loss
    if edges is None:
        edges = auto_edges(logC) if n_bins is None else np.linspace(logC.min(), logC.max(), n_bins + 1)
    edges = np.asarray(edges, dtype=float)
    xs = {"N": np.log(runs.N), "D": np.log(runs.D)}
    if np.isfinite(runs.epochs).all() and len(np.unique(runs.epochs)) >= min_points:
        xs["epochs"] = np.log(runs.epochs)
    rng = np.random.default_rng(seed)
    boots = [rng.integers(0, len(L), len(L)) for _ in range(n_boot)]
    result = {"log_C_edges": [float(e) for e in edges], "n_runs": len(runs), "profiles": {}}
    for name, lx in xs.items():
        _, codes = np.unique(lx, return_inverse=True)
        nc = int(codes.max()) + 1
        prof = _profile_core(logC, lx, L, edges, codes, nc, min_points, explain=True)
        slope, intercept = _exponent(prof)
        bs = np.array([_exponent(_profile_core(logC[j], lx[j], L[j], edges, codes[j], nc, min_points))[0]
                       for j in boots]).reshape(-1)
        fin = lambda x: float(x) if np.isfinite(x) else None        # noqa: E731
        bins = [{"C": fin(np.exp(prof["lc"][i])), "n_runs": int(prof["n"][i]),
                 f"{name}_opt": fin(np.exp(prof["lx"][i])), "loss_opt": fin(prof["loss"][i]),
                 "parabola": None if np.isnan(prof["coefs"][i]).any() else [float(c) for c in prof["coefs"][i]],
                 "skipped": str(prof["why"][i]) or None} for i in range(len(edges) - 1)]
        n_valid = sum(bn[f"{name}_opt"] is not None for bn in bins)
        result["profiles"][name] = {
            "exponent": slope, "exponent_ci": [float(v) for v in _percentile_ci(bs)], "intercept": intercept,
            "n_valid_bins": n_valid, "n_boot_failed": int(np.isnan(bs).sum()), "bins": bins,
            "formula": f"{name}_opt = exp(intercept) * C^exponent; parabola: loss = c0 + c1 ln x + c2 ln^2 x",
            "why_no_fit": None if np.isfinite(slope) else f"only {n_valid} bins with an interior minimum (need 3)"}
    return result


def best_lr_table(runs, *, n_boot=1000, seed=0) -> dict:
    """Per cell (family, N, training-set size, epochs) with >= 2 learning rates tried: the
    best one, and whether it sits at the edge of the tried range (then the true best may lie
    beyond, and the cell is left out of the fit when enough others remain). Fit:
    ln lr* = intercept + p_epochs ln epochs + p_N ln N (terms whose variable does not vary
    are dropped), bootstrap over cells. Pass one family at a time for the fit."""
    runs = as_runs(runs)
    ok = np.isfinite(runs.lr) & (runs.lr > 0)
    if not ok.any():
        raise UserError("no learning rates recorded in these runs: cannot tabulate the best learning rate")
    cells: dict = {}
    ntr = runs.n_train
    for i in np.flatnonzero(ok):
        key = (runs.family[i], runs.N[i], None if np.isnan(ntr[i]) else round(float(ntr[i]), 6),
               None if np.isnan(runs.epochs[i]) else float(runs.epochs[i]))
        cells.setdefault(key, []).append(i)
    table = []
    for (fam, N, n_train, ep), idx in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3] or 0)):
        idx = np.array(idx)
        lrs = np.unique(runs.lr[idx])
        if len(lrs) < 2:
            continue
        ch = idx[runs.chosen[idx]]
        j = ch[0] if len(ch) else idx[np.argmin(runs.loss[idx])]   # a cell swept on fewer seeds: its choice
        table.append({"family": str(fam), "N": float(N), "n_train": n_train, "epochs": ep,
                      "best_lr": float(runs.lr[j]), "loss": float(runs.loss[j]), "n_lrs": int(len(lrs)),
                      "lr_range": [float(lrs[0]), float(lrs[-1])],
                      "at_edge": bool(runs.lr[j] in (lrs[0], lrs[-1]))})
    return {"table": table, "fit": _lr_fit(table, n_boot, seed)}


def _lr_fit(table, n_boot, seed):
    rows = [r for r in table if r["epochs"] is not None]
    terms = [t for t, key in (("epochs", "epochs"), ("N", "N")) if len({r[key] for r in rows}) >= 2]
    inner = [r for r in rows if not r["at_edge"]]
    need = len(terms) + 2
    excluded = len(inner) >= need
    use = inner if excluded else rows
    if len(use) < need or not terms:
        return {"why_no_fit": f"need >= {need} cells with >= 2 learning rates and a varying epoch budget "
                              f"or size; got {len(rows)}"}
    y = np.log([r["best_lr"] for r in use])
    X = np.stack([np.ones(len(use))] + [np.log([r[t] for r in use]) for t in terms], axis=1)

    def solve(ix):
        if np.linalg.matrix_rank(X[ix]) < X.shape[1]:
            return np.full(X.shape[1], np.nan)
        return np.linalg.lstsq(X[ix], y[ix], rcond=None)[0]

    coef = solve(np.arange(len(y)))
    rng = np.random.default_rng(seed)
    boot = np.array([solve(rng.integers(0, len(y), len(y))) for _ in range(n_boot)]).reshape(n_boot, X.shape[1])
    ci = _percentile_ci(boot) if n_boot else np.full((2, X.shape[1]), np.nan)
    out = {"intercept": float(coef[0]), "lr_at_unit": float(np.exp(coef[0])), "n_cells_fit": len(use),
           "n_at_edge": sum(r["at_edge"] for r in rows), "edge_cells_excluded": excluded,
           "formula": "ln lr* = intercept + " + " + ".join(f"{t}_exponent ln {t}" for t in terms)}
    for i, t in enumerate(terms, start=1):
        out[f"{t}_exponent"] = float(coef[i])
        out[f"{t}_exponent_ci"] = [float(v) for v in ci[:, i]]
    return out
