"""Scaling-law fits on arrays of runs: the loss-compute frontier and the Chinchilla form.

Units: N parameters, D training examples seen (epochs x dataset size), C training FLOPs,
L validation loss (nats). All logs are natural logs. Intervals are bootstrap 95%
percentile intervals: runs are resampled with replacement and the whole fit is redone.

The Chinchilla fit follows Hoffmann et al. 2022 as corrected by Besiroglu et al. 2024:
  log L_hat = LSE(a - alpha log N, b - beta log D, e),  E = e^e, A = e^a, B = e^b,
minimize the SUM over runs of Huber_delta(log L_hat - log L), delta = 1e-3, with
L-BFGS-B from a grid of starts, keeping the best. Summing (not averaging) matters:
scipy's L-BFGS-B stops on absolute changes, so an averaged objective stops early.

Repeated data (runs of several epochs over a training set of U examples): D examples seen
are worth less than D fresh ones, which L(N, D) cannot express. The repeated-data form
(Muennighoff et al. 2023) replaces D by an effective amount of data
  D_eff = U_s (1 + R* (1 - exp(-R / R*))),  U_s = min(D, U),  R = max(D / U - 1, 0),
so repeats beyond the first pass count less and less (at most R* passes' worth); a sixth
parameter log R* is fitted with the other five. With R = 0 (no repeats) it is the plain form.

The overfitting form (below fit_chinchilla) adds a penalty growing with the passes over the
data, G epochs^omega with epochs = D / U, to the repeated-data form: 8 parameters. Which form
to trust is chosen on a validation fold of the fitted cells (choose_form), never on held-out ones.
"""
import os
from dataclasses import dataclass, field
from itertools import product

import numpy as np

from ..errors import UserError

HUBER_DELTA = 1e-3
PARAM_NAMES = ("a", "b", "e", "alpha", "beta")   # order of theta everywhere in this module
REPEAT_PARAM = "log_R_star"                        # the 6th entry of theta in the repeated-data form
LOG_R_STAR_BOUNDS = (np.log(1e-2), np.log(1e4))    # R* in passes; beyond 1e4 repeats are as good as new
REPEAT_STARTS = (0.5, 2.5)     # log R* values crossed with the grid of starts (on the studies tried,
                               # any one of 0, 0.5, 1, 1.5, 2, 2.5, 3 alone finds the same optimum)
# The start grid of Besiroglu et al. (5 x 5 x 5 x 6 x 6 = 4500 starts) ...
FULL_GRID = {"alpha": (0.0, 0.5, 1.0, 1.5, 2.0), "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
             "e": (-1.0, -0.5, 0.0, 0.5, 1.0), "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
             "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)}
# ... and every other value of it (3^5 = 243 starts): the default, ~20x faster, and on
# every data set tried here it finds the same optimum as the full grid.
COARSE_GRID = {k: v[::2] for k, v in FULL_GRID.items()}
MIN_FRONTIER_RUNS = 3
MIN_CHINCHILLA_RUNS, MIN_DISTINCT = 10, 3


def huber(r, delta=HUBER_DELTA):
    """Huber loss, elementwise: r^2/2 for |r| <= delta, delta (|r| - delta/2) beyond."""
    r = np.abs(np.asarray(r, dtype=float))
    return np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta))


def _logs(N, D, L):
    arrs = [np.asarray(x, dtype=float).ravel() for x in (N, D, L)]
    if len({a.size for a in arrs}) != 1:
        raise ValueError("N, D and L must have the same length")
    if any((~np.isfinite(a)).any() or (a <= 0).any() for a in arrs):
        raise UserError("N, D and loss must be finite and positive for a scaling fit")
    return tuple(np.log(a) for a in arrs)


def repeats(D, U):
    """(unique examples seen U_s, repeats R beyond the first pass) for D seen out of U."""
    D, U = np.asarray(D, dtype=float), np.asarray(U, dtype=float)
    return np.minimum(D, U), np.maximum(D / U - 1.0, 0.0)


def log_effective_data(logUs, reps, log_r_star):
    """(log D_eff, d log D_eff / d log R*) for unique examples seen exp(logUs), repeats reps."""
    r_star = np.exp(log_r_star)
    x = reps / r_star
    seen = -np.expm1(-x)                              # 1 - exp(-R/R*)
    g = r_star * seen                                 # extra passes' worth of data
    dg = r_star * (seen - x * np.exp(-x))             # d g / d log R*
    return logUs + np.log1p(g), dg / (1.0 + g)


def chinchilla_log_pred(theta, logN, logD, reps=None):
    """log L_hat (R,) for theta = (a, b, e, alpha, beta[, log R*]): a stable log-sum-exp.
    With a 6th entry, logD is log of the unique examples seen and reps the repeats (R,)."""
    a, b, e, alpha, beta = theta[:5]
    if len(theta) == 6:
        logD = log_effective_data(logD, np.zeros_like(logD) if reps is None else reps, theta[5])[0]
    t = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)], axis=1)  # (R, 3)
    m = t.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(t - m).sum(axis=1, keepdims=True)))[:, 0]


def chinchilla_objective(theta, logN, logD, logL, delta=HUBER_DELTA, reps=None):
    """(sum_i Huber(log L_hat_i - log L_i), gradient) for the L-BFGS fit. theta has 5
    entries, or 6 for the repeated-data form (then logD = log U_s and reps = R, see above).

    Written term by term (no (R, 3) stack): it is called ~10^5 times per bootstrap."""
    a, b, e, alpha, beta = theta[:5]
    repeated = len(theta) == 6
    if repeated:
        logD, dlogD = log_effective_data(logD, reps, theta[5])
    t1 = a - alpha * logN                     # log(A / N^alpha), (R,)
    t2 = b - beta * logD                      # log(B / D^beta)
    m = np.maximum(np.maximum(t1, t2), e)     # shift for a stable log-sum-exp
    s1, s2, s3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    tot = s1 + s2 + s3
    r = m + np.log(tot) - logL                # log-residuals
    ar = np.abs(r)
    f = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum()
    g = np.clip(r, -delta, delta) / tot       # Huber'(r) times the softmax normalizer
    g1, g2 = g * s1, g * s2                   # Huber'(r) * d LSE / d t1, d t2
    grad = [g1.sum(), g2.sum(), (g * s3).sum(), -(g1 @ logN), -(g2 @ logD)]
    if repeated:
        grad.append(-beta * (g2 @ dlogD))
    return float(f), np.array(grad)


def start_grid(grid="coarse", repeated=False) -> np.ndarray:
    """Starts (S, 5) in PARAM_NAMES order: 'coarse', 'full', a dict of value lists, or an array.
    repeated: (S, 6), the grid crossed with REPEAT_STARTS (or a dict's REPEAT_PARAM values)."""
    width = 6 if repeated else 5
    if isinstance(grid, str):
        if grid not in ("coarse", "full"):
            raise ValueError(f"grid must be 'coarse', 'full', a dict or an array, not {grid!r}")
        grid = COARSE_GRID if grid == "coarse" else FULL_GRID
    if isinstance(grid, dict):
        names = PARAM_NAMES + ((REPEAT_PARAM,) if repeated else ())
        grid = {REPEAT_PARAM: REPEAT_STARTS, **grid}
        return np.array(list(product(*(grid[k] for k in names))), dtype=float)
    return np.asarray(grid, dtype=float).reshape(-1, width)


SCREEN_ITER, POLISH = 50, 8    # grid search: every start for 50 iterations, then the best 8 to the end
TIGHT = {"ftol": 1e-15, "gtol": 1e-10, "maxiter": 2000}


def _minimize_from(starts, logN, logD, logL, delta, details=False, reps=None, objective=None, extra=(),
                   bounds="auto"):
    """Best (theta, objective) over L-BFGS-B runs from each start; with details also the
    per-start objectives (S,) and function-evaluation counts (S,).

    More than POLISH starts: each runs SCREEN_ITER iterations, then the POLISH best end
    points run to convergence (on noisy or degenerate data many starts creep along a flat
    valley for all 2000 iterations; screening cuts the search 2-6x and finds the same
    optimum, to 1e-10 of the objective, as running every start to the end on synthetic runs
    at noise 0.01 to 0.05 and on a smoke study)."""
    # A 5-parameter problem: OpenBLAS threads only spin (3x the CPU time, far more on a busy
    # machine). Effective when scipy's BLAS is first loaded here, as in the CLI.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        from scipy.optimize import minimize
    except ImportError:
        raise UserError("the Chinchilla fit needs scipy: pip install scipy") from None
    args = (logN, logD, logL, delta, reps) + tuple(extra)
    objective = chinchilla_objective if objective is None else objective
    if isinstance(bounds, str):
        # Only log R* is bounded (a flat direction once R* is far beyond the repeats in the data).
        bounds = [(None, None)] * 5 + [LOG_R_STAR_BOUNDS] if np.shape(starts)[1] == 6 else None
    # Tolerances are absolute in scipy and the summed objective is ~1e-3 here: the
    # defaults stop early (alpha off by ~0.006 on the synthetic check), so set them tight.
    screen = len(starts) > POLISH
    opts = {**TIGHT, "maxiter": SCREEN_ITER} if screen else TIGHT
    fs, nfev = np.full(len(starts), np.inf), np.zeros(len(starts), dtype=int)
    xs = np.array(starts, dtype=float)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for i, x0 in enumerate(starts):
            res = minimize(objective, x0, args=args, jac=True, method="L-BFGS-B", options=opts,
                           bounds=bounds)
            fs[i], nfev[i], xs[i] = res.fun, res.nfev, res.x
        if screen:
            fin = np.flatnonzero(np.isfinite(fs))
            for i in fin[np.argsort(fs[fin], kind="stable")][:POLISH]:
                res = minimize(objective, xs[i], args=args, jac=True, method="L-BFGS-B", options=TIGHT,
                               bounds=bounds)
                if np.isfinite(res.fun) and res.fun <= fs[i]:
                    fs[i], xs[i] = res.fun, res.x
                nfev[i] += res.nfev
    ok = np.isfinite(fs)
    if not ok.any():
        return (None, np.inf, fs, nfev) if details else (None, np.inf)
    b = int(np.flatnonzero(ok)[np.argmin(fs[ok])])
    best_x, best_f = xs[b], float(fs[b])
    return (best_x, best_f, fs, nfev) if details else (best_x, best_f)


def _percentile_ci(samples, axis=0):
    """95% percentile interval ignoring NaN (failed resamples); (2, ...) array."""
    samples = np.asarray(samples, dtype=float)
    with np.errstate(all="ignore"):
        if samples.size == 0 or np.min(np.isfinite(samples).sum(axis=axis)) < 2:
            return np.full((2,) + samples.shape[1:], np.nan)
        return np.nanpercentile(samples, [2.5, 97.5], axis=axis)


def allocation(theta, k=6.0, gamma=1.0):
    """Compute-optimal allocation for C = k N^gamma D (gamma = 1: C = k N D).

    Minimizing A/N^alpha + B/D^beta on that curve gives
      N*(C) = G (C/k)^(beta/(alpha + gamma beta)),  G = (alpha A / (gamma beta B))^(1/(alpha + gamma beta)),
      D*(C) = C / (k N*^gamma)  ~  C^(alpha/(alpha + gamma beta)).
    Returns (N exponent, D exponent, log G); NaN when alpha or beta <= 0 (no optimum).
    """
    a, b, _, alpha, beta = np.asarray(theta, dtype=float)[:5]
    if not (alpha > 0 and beta > 0):
        return np.nan, np.nan, np.nan
    den = alpha + gamma * beta
    logG = (np.log(alpha) + a - np.log(gamma * beta) - b) / den
    return beta / den, alpha / den, logG


@dataclass
class ChinchillaFit:
    theta: np.ndarray                  # (5,) best (a, b, e, alpha, beta); (6,) with log R* (repeated data)
    objective: float                   # summed Huber loss at theta
    n_runs: int
    n_starts: int
    k: float = 6.0                     # C = k N^gamma D for the allocation
    gamma: float = 1.0
    boot: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))   # (B, 5 or 6) refits

    @property
    def repeated(self) -> bool:
        """The repeated-data form (D replaced by D_eff, a 6th parameter R*)."""
        return len(self.theta) == 6

    @property
    def constant_names(self) -> tuple:
        return ("E", "A", "B", "alpha", "beta") + (("R_star",) if self.repeated else ())

    @property
    def params(self) -> dict:
        d = self._derived(self.theta)
        return {k: float(d[k]) for k in self.constant_names}

    def predict(self, N, D, theta=None, U=None):
        """Predicted loss L(N, D) (same shape as the broadcast of N and D). The repeated-data
        form also takes U, the training-set size; without it the D examples are all fresh."""
        N, D, U = np.broadcast_arrays(np.asarray(N, dtype=float), np.asarray(D, dtype=float),
                                      np.asarray(np.inf if U is None else U, dtype=float))
        Us, reps = repeats(D.ravel(), U.ravel())
        lp = chinchilla_log_pred(self.theta if theta is None else theta, np.log(N.ravel()), np.log(Us), reps)
        with np.errstate(over="ignore"):          # a degenerate bootstrap refit may predict beyond float range
            return np.exp(lp).reshape(N.shape)

    def optimal(self, C, theta=None):
        """(N*, D*, L*) at compute C (arrays) under C = k N^gamma D."""
        th = self.theta if theta is None else theta
        eN, _, logG = allocation(th, self.k, self.gamma)
        C = np.asarray(C, dtype=float)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            N = np.exp(logG + eN * np.log(C / self.k))
            D = C / (self.k * N ** self.gamma)
        return N, D, self.predict(N, D, th)

    def _derived(self, theta):
        a, b, e, alpha, beta = theta[:5]
        eN, eD, logG = allocation(theta, self.k, self.gamma)
        with np.errstate(over="ignore"):      # a degenerate fit may put A or B beyond float range
            d = {"E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta,
                 "N_opt_exponent": eN, "D_opt_exponent": eD, "N_opt_coef": np.exp(logG)}
            if len(theta) == 6:
                d["R_star"] = np.exp(theta[5])
            return d

    def intervals(self) -> dict:
        """name -> [lo, hi] (95%) for the constants and the allocation exponents."""
        if len(self.boot) == 0:
            return {}
        rows = [self._derived(t) for t in self.boot]
        return {k: [float(v) for v in _percentile_ci([r[k] for r in rows])] for k in rows[0]}

    def to_dict(self) -> dict:
        d = self._derived(self.theta)
        return {"constants": {k: float(d[k]) for k in self.constant_names},
                "form": ("L = E + A/N^alpha + B/D_eff^beta, D_eff = U_s (1 + R_star (1 - exp(-R/R_star)))"
                         if self.repeated else "L = E + A/N^alpha + B/D^beta"),
                "compute_optimal": {"k": self.k, "gamma": self.gamma,
                                    "N_opt_exponent": float(d["N_opt_exponent"]),
                                    "D_opt_exponent": float(d["D_opt_exponent"]),
                                    "N_opt_coef": float(d["N_opt_coef"]),
                                    "formula": "N* = N_opt_coef (C/k)^N_opt_exponent, D* = C/(k N*^gamma)"},
                "intervals": self.intervals(), "objective": self.objective, "n_runs": self.n_runs,
                "n_starts": self.n_starts, "n_boot": int(len(self.boot)),
                "n_boot_failed": int((~np.isfinite(self.boot).all(axis=1)).sum()) if len(self.boot) else 0,
                "huber_delta": HUBER_DELTA}


def chinchilla_problem(N, D) -> str | None:
    """Why the Chinchilla form cannot be fitted to these runs, or None."""
    N, D = np.asarray(N), np.asarray(D)
    nN, nD = len(np.unique(N)), len(np.unique(D))
    if len(N) < MIN_CHINCHILLA_RUNS or nN < MIN_DISTINCT or nD < MIN_DISTINCT:
        return (f"the Chinchilla form has 5 parameters: it needs >= {MIN_CHINCHILLA_RUNS} runs with "
                f">= {MIN_DISTINCT} distinct N and >= {MIN_DISTINCT} distinct D; got {len(N)} runs, "
                f"{nN} distinct N, {nD} distinct D")
    return None


def fit_chinchilla(N, D, L, *, grid="coarse", n_boot=1000, seed=0, k=6.0, gamma=1.0,
                   delta=HUBER_DELTA, boot_starts=2, U=None) -> ChinchillaFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta; bootstrap refits warm-start from the optimum.
    U (training-set size per run) fits the repeated-data form instead (see the module text)."""
    logN, logD, logL = _logs(N, D, L)
    why = chinchilla_problem(logN, logD)
    if why:
        raise UserError(f"too few runs to fit: {why}")
    reps = None
    if U is not None:
        U = np.broadcast_to(np.asarray(U, dtype=float).ravel(), logD.shape)
        if (~np.isfinite(U) | (U <= 0)).any():
            raise UserError("the repeated-data fit needs every run's training-set size (finite, positive)")
        Us, reps = repeats(np.exp(logD), U)
        logD = np.log(Us)
    starts = start_grid(grid, repeated=reps is not None)
    theta, f, fs, nfev = _minimize_from(starts, logN, logD, logL, delta, details=True, reps=reps)
    if theta is None:
        raise UserError("the Chinchilla fit failed from every start (non-finite objective)")
    # Bootstrap starts: the optimum itself, plus the `boot_starts` grid starts that reached
    # it on the full data fastest (insurance against a resample moving the basin; in trials
    # they never beat the warm start, and each costs ~10 ms).
    good = np.flatnonzero(fs <= f + 1e-9 * max(f, 1e-12) + 1e-15)
    extra = starts[good[np.argsort(nfev[good], kind="stable")][:boot_starts]]
    boot_x0 = np.vstack([theta[None], extra])
    rng = np.random.default_rng(seed)
    R = len(logL)
    boot = np.full((n_boot, len(theta)), np.nan)
    for i in range(n_boot):
        idx = rng.integers(0, R, R)
        if len(np.unique(logN[idx])) < MIN_DISTINCT or len(np.unique(logD[idx])) < MIN_DISTINCT:
            continue                                       # resample cannot identify the form
        bt, _ = _minimize_from(boot_x0, logN[idx], logD[idx], logL[idx], delta,
                               reps=None if reps is None else reps[idx])
        if bt is not None:
            boot[i] = bt
    return ChinchillaFit(theta=theta, objective=f, n_runs=R, n_starts=len(starts), k=k, gamma=gamma,
                         boot=boot)


def frontier_indices(C, L) -> np.ndarray:
    """Indices of the lower envelope: runs with lower loss than every run of less or equal
    compute (sorted by C). The envelope value at any C is the loss of the last such run."""
    C, L = np.asarray(C, dtype=float), np.asarray(L, dtype=float)
    order = np.lexsort((L, C))                 # by C, ties by loss
    best, keep = np.inf, []
    for i in order:
        if L[i] < best:
            keep.append(i)
            best = L[i]
    return np.array(keep, dtype=int)


def _line(x, y):
    """Least-squares (slope, intercept) of y on x; NaN if x has < 2 distinct values."""
    xm, ym = x.mean(), y.mean()
    sxx = ((x - xm) ** 2).sum()
    if len(x) < 2 or not sxx > 1e-12 * max(1.0, xm * xm):
        return np.nan, np.nan
    slope = ((x - xm) * (y - ym)).sum() / sxx
    return float(slope), float(ym - slope * xm)


def frontier_boot(C, L, n_boot, seed=0) -> np.ndarray:
    """(n_boot, 2) (slope, intercept) refits of the frontier on runs resampled with replacement
    (NaN where a resample's envelope has < 2 distinct computes)."""
    C, L = np.asarray(C, dtype=float), np.asarray(L, dtype=float)
    logC, logL = np.log(C), np.log(L)
    rng = np.random.default_rng(seed)
    boot = np.full((n_boot, 2), np.nan)
    for i in range(n_boot):
        j = rng.integers(0, len(C), len(C))
        fj = j[frontier_indices(C[j], L[j])]
        boot[i] = _line(logC[fj], logL[fj])
    return boot


def frontier(C, L, *, n_boot=1000, seed=0) -> dict:
    """Frontier of loss vs compute: log L = intercept + slope log C fitted on the envelope."""
    C, L = np.asarray(C, dtype=float).ravel(), np.asarray(L, dtype=float).ravel()
    if len(C) < MIN_FRONTIER_RUNS:
        raise UserError(f"too few runs to fit: the frontier needs >= {MIN_FRONTIER_RUNS} runs, got {len(C)}")
    if (~np.isfinite(C) | (C <= 0) | ~np.isfinite(L) | (L <= 0)).any():
        raise UserError("compute and loss must be finite and positive for the frontier fit")
    logC, logL = np.log(C), np.log(L)
    idx = frontier_indices(C, L)
    slope, intercept = _line(logC[idx], logL[idx])
    Cref = float(np.exp(np.median(logC)))     # a compute inside the data, for a readable loss
    boot = frontier_boot(C, L, n_boot, seed)
    ci = _percentile_ci(boot)
    at_ref = intercept + slope * np.log(Cref)
    at_ref_ci = _percentile_ci(boot[:, 1] + boot[:, 0] * np.log(Cref))
    return {"slope": slope, "intercept": intercept, "slope_ci": [float(v) for v in ci[:, 0]],
            "intercept_ci": [float(v) for v in ci[:, 1]], "C_ref": Cref, "loss_at_C_ref": float(np.exp(at_ref)),
            "loss_at_C_ref_ci": [float(np.exp(v)) for v in at_ref_ci], "n_runs": int(len(C)),
            "points": [int(i) for i in idx], "n_boot": n_boot,
            "formula": "L = exp(intercept) * C^slope on the lower envelope",
            "why_no_fit": None if len(idx) >= 2 else "the envelope has one point: more compute never lowered the loss"}


def frontier_predict(fr: dict, C):
    return np.exp(fr["intercept"] + fr["slope"] * np.log(np.asarray(C, dtype=float)))


# -- the overfitting form ------------------------------------------------------------------
# Repeated data does more than saturate: past a few passes over a small training set the
# validation loss of a large net stops falling and rises (on the embedded digits, N = 78.7k
# on 1,573 digits: 0.288 at 4 epochs, 0.291 at 8; on 3,146: 0.206 -> 0.220). D_eff can only
# flatten the curve, never lift it. The overfitting form adds a penalty that grows with the
# number of passes, epochs = D / U:
#   L = E + A/N^alpha + B/D_eff^beta + G epochs^omega,   G = e^g, omega >= 0,
#   log L_hat = LSE(a - alpha log N, b - beta log D_eff, e, g + omega log epochs),
# with D_eff of the repeated-data form (8 parameters). G -> 0 gives the repeated-data form back.
OVERFIT_PARAMS = ("log_G", "omega")               # entries 7 and 8 of theta in the overfitting form
OMEGA_BOUNDS = (0.0, 8.0)                         # a penalty that grows with passes, at most as epochs^8
LOG_G_BOUNDS = (-40.0, 10.0)
OVERFIT_STARTS = {"log_G": (-8.0, -5.0, -3.0), "omega": (0.5, 1.0, 2.0, 4.0)}   # crossed with the
                                                  # repeated-data optimum; the grid gets (-5, 1)
OVERFIT_GRID_START = (-5.0, 1.0)
MIN_EPOCH_BUDGETS = 3                             # omega needs >= 3 distinct pass counts


def overfit_log_pred(theta, logN, logUs, reps, logEp):
    """log L_hat (R,) of the overfitting form; theta = (a, b, e, alpha, beta, log R*, log G, omega),
    logUs / reps as in the repeated-data form, logEp = log(D / U) (-inf: no penalty)."""
    base = chinchilla_log_pred(np.asarray(theta[:6], dtype=float), logN, logUs, reps)
    with np.errstate(invalid="ignore"):
        pen = np.where(np.isfinite(logEp), theta[6] + theta[7] * logEp, -np.inf)
    return np.logaddexp(base, pen)


def overfit_objective(theta, logN, logUs, logL, delta=HUBER_DELTA, reps=None, logEp=None):
    """(sum_i Huber(log L_hat_i - log L_i), gradient (8,)) of the overfitting form."""
    a, b, e, alpha, beta, lrs, g, omega = theta
    logD, dlogD = log_effective_data(logUs, reps, lrs)
    t1, t2, t4 = a - alpha * logN, b - beta * logD, g + omega * logEp
    m = np.maximum(np.maximum(t1, t2), np.maximum(e, t4))
    s1, s2, s3, s4 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m), np.exp(t4 - m)
    tot = s1 + s2 + s3 + s4
    r = m + np.log(tot) - logL
    ar = np.abs(r)
    f = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum()
    gh = np.clip(r, -delta, delta) / tot
    g1, g2, g4 = gh * s1, gh * s2, gh * s4
    grad = [g1.sum(), g2.sum(), (gh * s3).sum(), -(g1 @ logN), -(g2 @ logD), -beta * (g2 @ dlogD),
            g4.sum(), g4 @ logEp]
    return float(f), np.array(grad)


@dataclass
class OverfitFit(ChinchillaFit):
    """The overfitting form: theta (8,) = (a, b, e, alpha, beta, log R*, log G, omega)."""
    boot: np.ndarray = field(default_factory=lambda: np.zeros((0, 8)))

    @property
    def repeated(self) -> bool:
        return True

    @property
    def constant_names(self) -> tuple:
        return ("E", "A", "B", "alpha", "beta", "R_star", "G", "omega")

    def predict(self, N, D, theta=None, U=None):
        """Predicted loss; without U the examples are all fresh and the penalty is 0."""
        N, D, U = np.broadcast_arrays(np.asarray(N, dtype=float), np.asarray(D, dtype=float),
                                      np.asarray(np.inf if U is None else U, dtype=float))
        Us, reps = repeats(D.ravel(), U.ravel())
        with np.errstate(divide="ignore"):
            logEp = np.log(D.ravel() / U.ravel())
        lp = overfit_log_pred(self.theta if theta is None else theta, np.log(N.ravel()), np.log(Us), reps, logEp)
        with np.errstate(over="ignore"):
            return np.exp(lp).reshape(N.shape)

    def _derived(self, theta):
        d = super()._derived(np.asarray(theta[:6], dtype=float))
        with np.errstate(over="ignore"):
            d.update({"G": np.exp(theta[6]), "omega": theta[7]})
        return d

    def to_dict(self) -> dict:
        return {**super().to_dict(), "form": "L = E + A/N^alpha + B/D_eff^beta + G epochs^omega, "
                                             "D_eff = U_s (1 + R_star (1 - exp(-R/R_star))), epochs = D/U"}


def overfit_problem(D, U) -> str | None:
    """Why the overfitting form cannot be fitted to these runs (beyond chinchilla_problem), or None."""
    with np.errstate(all="ignore"):
        ep = np.asarray(D, dtype=float) / np.asarray(U, dtype=float)
    if not np.isfinite(ep).all():
        return "the overfitting form needs every run's training-set size"
    n = len(np.unique(np.round(ep, 9)))
    if n < MIN_EPOCH_BUDGETS:
        return (f"the overfitting form needs >= {MIN_EPOCH_BUDGETS} distinct pass counts (epochs = D/U) "
                f"to fit its exponent; got {n}")
    return None


def fit_overfit(N, D, L, U, *, grid="coarse", n_boot=1000, seed=0, k=6.0, gamma=1.0, delta=HUBER_DELTA,
                boot_starts=2) -> OverfitFit:
    """Fit the overfitting form (see above). Starts: the repeated-data optimum crossed with
    OVERFIT_STARTS (the form nests it at G -> 0), and the repeated-data start grid with
    OVERFIT_GRID_START; bootstrap refits warm-start from the optimum, as fit_chinchilla's."""
    logN, logD, logL = _logs(N, D, L)
    why = chinchilla_problem(logN, logD)
    U = np.broadcast_to(np.asarray(U, dtype=float).ravel(), logD.shape)
    why = why or ("the overfitting form needs every run's training-set size (finite, positive)"
                  if (~np.isfinite(U) | (U <= 0)).any() else overfit_problem(np.exp(logD), U))
    if why:
        raise UserError(f"too few runs to fit: {why}")
    Us, reps = repeats(np.exp(logD), U)
    logUs, logEp = np.log(Us), logD - np.log(U)
    base = fit_chinchilla(N, D, L, grid=grid, n_boot=0, k=k, gamma=gamma, delta=delta, U=U).theta
    warm = np.array([np.r_[base, g, w] for g in OVERFIT_STARTS["log_G"] for w in OVERFIT_STARTS["omega"]])
    cold = np.hstack([start_grid(grid, repeated=True), np.tile(OVERFIT_GRID_START, (len(start_grid(grid, True)), 1))])
    starts = np.vstack([warm, cold])
    bounds = [(None, None)] * 5 + [LOG_R_STAR_BOUNDS, LOG_G_BOUNDS, OMEGA_BOUNDS]
    kw = {"objective": overfit_objective, "bounds": bounds}
    theta, f, fs, nfev = _minimize_from(starts, logN, logUs, logL, delta, details=True, reps=reps,
                                        extra=(logEp,), **kw)
    if theta is None:
        raise UserError("the overfitting fit failed from every start (non-finite objective)")
    good = np.flatnonzero(fs <= f + 1e-9 * max(f, 1e-12) + 1e-15)
    boot_x0 = np.vstack([theta[None], starts[good[np.argsort(nfev[good], kind="stable")][:boot_starts]]])
    rng = np.random.default_rng(seed)
    R = len(logL)
    boot = np.full((n_boot, 8), np.nan)
    for i in range(n_boot):
        idx = rng.integers(0, R, R)
        if (len(np.unique(logN[idx])) < MIN_DISTINCT or len(np.unique(logD[idx])) < MIN_DISTINCT
                or len(np.unique(np.round(logEp[idx], 9))) < MIN_EPOCH_BUDGETS):
            continue
        bt, _ = _minimize_from(boot_x0, logN[idx], logUs[idx], logL[idx], delta, reps=reps[idx],
                               extra=(logEp[idx],), **kw)
        if bt is not None:
            boot[i] = bt
    return OverfitFit(theta=theta, objective=f, n_runs=R, n_starts=len(starts), k=k, gamma=gamma, boot=boot)


# -- the forms, by name, and choosing one without the held-out cells ------------------------
FORMS = {"chinchilla": "L(N, D)", "chinchilla_repeated": "repeated data", "chinchilla_overfit": "overfitting"}


def fit_form(name, N, D, L, U=None, **kw) -> ChinchillaFit:
    """Fit the named form (FORMS) to runs; U is the training-set size the last two need."""
    if name == "chinchilla":
        return fit_chinchilla(N, D, L, **kw)
    if name == "chinchilla_repeated":
        return fit_chinchilla(N, D, L, U=U, **kw)
    if name == "chinchilla_overfit":
        return fit_overfit(N, D, L, U, **kw)
    raise ValueError(f"unknown form {name!r}; forms: {', '.join(FORMS)}")


def choose_form(N, D, C, L, U, forms, *, frac=0.1, grid="coarse", k=6.0, gamma=1.0) -> dict:
    """Choose a form on the cells it may be fitted on, never on the held-out ones: a validation
    fold made like the held-out cells (the top `frac` of THESE cells by compute C) is predicted
    by each form fitted to the rest; the lowest mean |relative error| on the fold is chosen.
    Returns per form the fold's mean and max |error| (or why it could not be fitted), 'chosen'."""
    order = np.argsort(np.asarray(C, dtype=float).ravel(), kind="stable")
    N, D, L = (np.asarray(x, dtype=float).ravel()[order] for x in (N, D, L))
    U = np.broadcast_to(np.asarray(np.nan if U is None else U, dtype=float).ravel(), order.shape)[order]
    R = len(L)
    n_val = max(1, int(np.ceil(frac * R)))
    fit_i, val_i = np.arange(R - n_val), np.arange(R - n_val, R)
    out = {"rule": (f"fit each form on the {R - n_val} fitted cells of lowest compute, predict the next "
                    f"{n_val} (the fitted cells' top {frac:.0%} by compute); choose the lowest mean |error|"),
           "n_fit": int(R - n_val), "n_validation": int(n_val), "forms": {}}
    for name in forms:
        try:
            fit = fit_form(name, N[fit_i], D[fit_i], L[fit_i], U[fit_i], n_boot=0, grid=grid, k=k, gamma=gamma)
        except UserError as e:
            out["forms"][name] = {"why_no_fit": str(e)}
            continue
        rel = fit.predict(N[val_i], D[val_i], U=None if name == "chinchilla" else U[val_i]) / L[val_i] - 1
        out["forms"][name] = {"mean_abs_rel_err": float(np.abs(rel).mean()), "max_abs_rel_err": float(np.abs(rel).max()),
                              "objective_on_fit_cells": fit.objective}
    ok = {n: f["mean_abs_rel_err"] for n, f in out["forms"].items() if "mean_abs_rel_err" in f
          and np.isfinite(f["mean_abs_rel_err"])}
    out["chosen"] = min(ok, key=ok.get) if ok else None
    return out
