"""Where progress comes from: each recipe's compute and data curves, effective-compute and
effective-data multipliers with bootstrap intervals, and a Shapley split of the drop in error.

A recipe is a preset (ladder rungs 1-5 on the per-example fast engine, the speedrun and rung 7
on the population engine, or any preset named). For each recipe, on the 1989 net:
  compute curve   test error after budgets of BUDGETS x the recipe's passes on the whole
                  training set; every budget is its own run with its schedule scaled to its
                  own length (passes are whole: the finest budget is one pass), never a
                  truncated longer run
  data curve      test error after the recipe's full passes on SIZES x the training digits
                  (the first n of the canonical order)
Compute is training FLOPs a replica (experiments/costs.py: passes x digits x 6 x MACs).
Each curve is fitted with a power law with a floor, err = E + A (x / x0)^-alpha (x0 the
geometric mean of the points' x, so A is the excess error mid-range), by least squares on
relative error; intervals are percentiles of B bootstrap refits, each resampling the seeds of
every point with replacement.

Effective-compute multiplier of recipe B over recipe A at one of B's budgets: the compute A's
fitted curve needs to reach B's measured error there, divided by B's compute. Infinite when B's
error is below A's floor ("beyond A's floor"); flagged "extrapolated" when A would need more
compute than it was measured at. The multiplier's interval is over bootstrap draws of both
recipes. B shifts A's curve (a constant multiplier) when the slopes agree within the interval
of alpha_B - alpha_A, and changes its slope otherwise. The effective-data multiplier is the
same on the data curves: how many more training digits A needs to match B.

Decomposition: the drop in mean test error from (recipe A, n/4 digits, 1/4 of A's passes) to
(recipe B, n digits, B's passes) on the 2 x 2 x 2 grid of {A, B} x {n/4, n} x {1/4, 1} of the
recipe's passes, split into algorithm, data and compute shares by Shapley values: a factor's
share is its marginal drop averaged over the 6 orders in which the three factors can be
switched on (so the shares add up to the whole drop; interactions are split evenly).
Intervals: the same bootstrap over seeds. The compute factor is 4x each recipe's own passes;
the algorithm factor includes the recipe's own pass count (rung 1's 23 against rung 5's 80).
"""
import itertools
import math
from fractions import Fraction

import numpy as np

from ..config import PRESETS, preset, validate
from ..errors import UserError
from .costs import model_macs

DEFAULT_RECIPES = ("rung1", "rung2", "rung3", "rung4", "rung5", "speedrun", "rung7")
BUDGETS = (Fraction(1, 16), Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(1))
SIZES = (Fraction(1, 4), Fraction(1, 2), Fraction(1))
DECOMPOSE = ("rung1", "rung5")
MIN_POINTS = 3               # a power law with a floor has 3 parameters
SMOKE_N, SMOKE_TEST, SMOKE_PASSES = 300, 200, 8
START = "1989-2022"         # the ladder's span, for the published comparison
MONTHS = 33 * 12
PUBLISHED = [  # compute-equivalent algorithmic progress: doubling time in months
    ("computer vision (ImageNet), Erdil and Besiroglu 2022", 9.0),
    ("language models, Ho et al. 2024", 8.0),
]


def parse_fractions(text, what: str) -> tuple:
    if text is None:
        return None
    out = []
    for t in (s.strip() for s in str(text).split(",")):
        if not t:
            continue
        try:
            f = Fraction(t)
        except (ValueError, ZeroDivisionError):
            raise UserError(f"--{what}: {t!r} is not a number or a fraction like 1/4") from None
        if not 0 < f <= 1:
            raise UserError(f"--{what}: {t} must be in (0, 1] (a fraction of the recipe's own)")
        out.append(f)
    if not out:
        raise UserError(f"--{what}: give at least one fraction")
    return tuple(sorted(set(out)))


def parse_recipes(text) -> list[str]:
    names = list(DEFAULT_RECIPES) if text is None else [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [n for n in names if n not in PRESETS]
    if bad:
        raise UserError(f"unknown recipe {', '.join(bad)}; known: {', '.join(sorted(PRESETS))}")
    if len(set(names)) < 2:
        raise UserError(f"--recipes {','.join(names)}: multipliers compare recipes: name at least two")
    return list(dict.fromkeys(names))


def recipe_base(name: str, seeds: int, smoke: bool):
    cfg = preset(name)
    if cfg.model.name != "net1989":
        raise UserError(f"recipe {name}: model.name={cfg.model.name}; the compute curves are on the 1989 net")
    cfg.train.seeds, cfg.train.eval_train = seeds, False
    if cfg.data.val:  # curves are measured on the whole training set; nothing here is chosen
        cfg.data.val = 0
    if smoke:
        cfg.data.n_train, cfg.data.n_test = SMOKE_N, SMOKE_TEST
        cfg.train.passes = min(cfg.train.passes, SMOKE_PASSES)
    return cfg


def _n_train(cfg) -> int:
    from ..data import load_dataset
    if cfg.data.n_train is not None:
        return int(cfg.data.n_train)
    return len(load_dataset(cfg.data.source, None, 1).train_x)


def point_config(base, name: str, n: int, passes: int):
    from ..config import from_dict
    cfg = from_dict(base.to_dict())
    cfg.name = f"progress-{name}-n{n}-p{passes}"
    cfg.data.n_train, cfg.train.passes = n, passes
    cfg.train.eval_every = passes  # evaluated once, at the end: nothing watches the curve
    return validate(cfg)


def plan(recipes, seeds=4, budgets=None, sizes=None, decompose=DECOMPOSE, smoke=False) -> dict:
    """-> {"configs": {(recipe, n, passes): Config}, "curves": {recipe: {"compute": [keys], "data": [keys]}},
    "decompose": {...} or None}. Errors name the recipe whose budgets give too few points."""
    budgets, sizes = budgets or BUDGETS, sizes or SIZES
    cfgs, curves = {}, {}
    for name in recipes:
        base = recipe_base(name, seeds, smoke)
        N, P = _n_train(base), base.train.passes
        comp = sorted({max(1, round(P * f)) for f in budgets})
        data = sorted({max(10, round(N * f)) for f in sizes})
        for what, pts in (("budgets", comp), ("sizes", data)):
            if len(pts) < MIN_POINTS:
                raise UserError(f"recipe {name}: --{what} give {len(pts)} distinct points "
                                f"({', '.join(map(str, pts))}); a fit needs {MIN_POINTS}")
        curves[name] = {"compute": [(name, N, p) for p in comp], "data": [(name, n, P) for n in data],
                        "n_train": N, "passes": P}
        for key in curves[name]["compute"] + curves[name]["data"]:
            cfgs[key] = point_config(base, name, key[1], key[2])
    dec = None
    if decompose:
        a, b = decompose
        for r in (a, b):
            if r not in curves:
                raise UserError(f"--decompose {a},{b}: {r} is not among the recipes")
        dec = {"algorithms": [a, b], "cells": {}}
        for ia, r in enumerate((a, b)):
            N, P = curves[r]["n_train"], curves[r]["passes"]
            for idd, n in enumerate((max(10, round(N / 4)), N)):  # as the data curve's 1/4: the same run
                for ic, p in enumerate((max(1, round(P / 4)), P)):
                    key = (r, n, p)
                    if key not in cfgs:
                        cfgs[key] = point_config(recipe_base(r, seeds, smoke), r, n, p)
                    dec["cells"][(ia, idd, ic)] = key
    return {"configs": cfgs, "curves": curves, "decompose": dec}


def flops(cfg, n: int, passes: int) -> float:
    return float(passes) * n * 6.0 * model_macs(cfg.model)


# ---------------------------------------------------------------- fits

def _predict(theta, x, x0):
    E, A, alpha = theta
    return E + A * (np.asarray(x, float) / x0) ** (-alpha)


ALPHAS = np.linspace(0.01, 5.0, 500)   # the slope grid the fit profiles before refining


def _profile(alpha, x, y, x0):
    """For each alpha: the (E, A) minimising sum ((E + A z - y) / y)^2, z = (x/x0)^-alpha, with
    E >= 0 and A >= 0 (closed form: weighted linear least squares), and that sum."""
    alpha = np.atleast_1d(np.asarray(alpha, float))
    z = (x[None, :] / x0) ** (-alpha[:, None])
    w = 1.0 / y ** 2
    sw, sz, szz = w.sum(), (w * z).sum(1), (w * z * z).sum(1)
    sy, szy = (w * y).sum(), (w * z * y).sum(1)
    det = sw * szz - sz * sz
    with np.errstate(divide="ignore", invalid="ignore"):
        E = (szz * sy - sz * szy) / det
        A = (sw * szy - sz * sy) / det
    clip = ~(E >= 0) | ~np.isfinite(E)  # the floor at 0: A alone
    A = np.where(clip, szy / szz, A)
    E = np.where(clip, 0.0, E)
    A = np.maximum(A, 0.0)
    r = (E[:, None] + A[:, None] * z - y[None, :]) / y[None, :]
    return E, A, (r * r).sum(1)


def fit_power_floor(x, y) -> tuple:
    """Least squares on relative error of y = E + A (x/x0)^-alpha, E >= 0, A >= 0, alpha in
    (0, 5]: (E, A) in closed form for each alpha, alpha on a grid of 500, then on a grid of 101
    between the best one's neighbours. -> (E, A, alpha, x0)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < MIN_POINTS or np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise ValueError("a power law with a floor needs 3 positive, finite points")
    x0 = float(np.exp(np.mean(np.log(x))))
    _, _, cost = _profile(ALPHAS, x, y, x0)
    k = int(np.argmin(cost))
    fine = np.linspace(ALPHAS[max(k - 1, 0)], ALPHAS[min(k + 1, len(ALPHAS) - 1)], 101)
    E, A, cost = _profile(fine, x, y, x0)
    j = int(np.argmin(cost))
    return float(E[j]), float(A[j]), float(fine[j]), x0


def inverse(theta, x0, level: float) -> float:
    """The x at which the fitted curve reaches `level` (inf below the floor)."""
    E, A, alpha = theta
    if level <= E:
        return math.inf
    return x0 * (A / (level - E)) ** (1.0 / alpha)


class Curve:
    """One recipe's points (x, seeds' errors) and its fit with bootstrap draws."""

    def __init__(self, x, errors, n_boot: int, rng):
        order = np.argsort(x)
        self.x = np.asarray(x, float)[order]
        self.errors = [np.asarray(errors[i], float) for i in order]
        self.mean = np.array([e.mean() for e in self.errors])
        self.std = np.array([e.std(ddof=1) if len(e) > 1 else 0.0 for e in self.errors])
        E, A, alpha, self.x0 = fit_power_floor(self.x, self.mean)
        self.theta = (E, A, alpha)
        self.boot_means = np.array([[rng.choice(e, len(e)).mean() for e in self.errors] for _ in range(n_boot)])
        thetas = []
        for m in self.boot_means:
            try:
                thetas.append(fit_power_floor(self.x, m)[:3])
            except (ValueError, TypeError):  # a resample with a zero error: keep the draw count honest
                thetas.append((np.nan, np.nan, np.nan))
        self.boot = np.array(thetas)

    def params(self) -> dict:
        out = {}
        for i, k in enumerate(("floor", "amplitude", "alpha")):
            lo, hi = _ci(self.boot[:, i])
            out[k], out[f"{k}_ci"] = float(self.theta[i]), [lo, hi]
        return out


def _ci(samples, q=(2.5, 97.5)):
    s = np.asarray(samples, float)
    s = s[~np.isnan(s)]
    if len(s) == 0:
        return [math.nan, math.nan]
    s = np.sort(s)  # infinite draws sort last: the upper end may be inf
    idx = [min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1))))) for p in q]
    return [float(s[i]) for i in idx]


def multiplier(A: Curve, B: Curve, i: int) -> dict:
    """B over A at B's point i: A's fitted x to reach B's measured error there / B's x."""
    level, xb = float(B.mean[i]), float(B.x[i])
    m = inverse(A.theta, A.x0, level) / xb
    draws = [inverse(ta, A.x0, lb) / xb if np.all(np.isfinite(ta)) else math.nan
             for ta, lb in zip(A.boot, B.boot_means[:, i])]
    d = np.array(draws, float)
    lo, hi = _ci(d)
    return {"x": xb, "error": level, "multiplier": m, "ci": [lo, hi],
            "beyond_floor": not math.isfinite(m), "share_beyond_floor": float(np.mean(np.isinf(d))),
            "extrapolated": bool(math.isfinite(m) and m * xb > A.x.max() * (1 + 1e-9))}


def slope_verdict(A: Curve, B: Curve) -> dict:
    d = B.boot[:, 2] - A.boot[:, 2]
    lo, hi = _ci(d)
    diff = float(B.theta[2] - A.theta[2])
    changes = bool(lo > 0 or hi < 0)
    return {"alpha_diff": diff, "alpha_diff_ci": [lo, hi],
            "verdict": "changes the slope" if changes else "shifts the curve (slopes agree within the CI)"}


def compare(A: Curve, B: Curve) -> dict:
    return {"at": [multiplier(A, B, i) for i in range(len(B.x))], **slope_verdict(A, B)}


# ---------------------------------------------------------------- Shapley

def shapley(value) -> dict:
    """value(frozenset of factor indices 0..2 switched on) -> number; -> {i: share}, exact."""
    n = 3
    phi = {}
    for i in range(n):
        tot = 0.0
        for order in itertools.permutations(range(n)):
            before = frozenset(order[:order.index(i)])
            tot += value(before | {i}) - value(before)
        phi[i] = tot / math.factorial(n)
    return phi


FACTORS = ("algorithm", "data", "compute")


def decompose(cells: dict, errors: dict, n_boot: int, rng) -> dict:
    """cells: (ia, id, ic) -> key; errors: key -> seeds' test errors. Drop = err(0,0,0) - err(S)."""
    def value_of(means):
        def v(S):
            return means[(0, 0, 0)] - means[tuple(int(k in S) for k in range(3))]
        return v
    means = {c: float(np.mean(errors[k])) for c, k in cells.items()}
    phi = shapley(value_of(means))
    boots = []
    for _ in range(n_boot):
        bm = {c: float(rng.choice(np.asarray(errors[k]), len(errors[k])).mean()) for c, k in cells.items()}
        boots.append(shapley(value_of(bm)))
    total = means[(0, 0, 0)] - means[(1, 1, 1)]
    out = {"from_error": means[(0, 0, 0)], "to_error": means[(1, 1, 1)], "drop": total,
           "cells": {",".join(map(str, c)): {"key": list(cells[c]), "test_error": means[c]} for c in cells}}
    for i, f in enumerate(FACTORS):
        draws = [b[i] for b in boots]
        share_draws = [b[i] / sum(b.values()) for b in boots if abs(sum(b.values())) > 1e-12]
        out[f] = {"points": phi[i], "points_ci": _ci(draws), "share": phi[i] / total if total else math.nan,
                  "share_ci": _ci(share_draws)}
    return out


def doubling_months(m: float, months: float = MONTHS) -> float:
    """Compute-equivalent doubling time implied by a multiplier m gained over `months` (0 for an
    infinite multiplier: no lower limit; nan for m <= 1)."""
    if not math.isfinite(m) or m <= 1:
        return math.nan if m <= 1 else 0.0
    return months * math.log(2) / math.log(m)


# ---------------------------------------------------------------- the study

def analyse(plan_: dict, results: dict, reference=("rung1", "rung5"), n_boot=300, seed=0) -> dict:
    """results: key -> Result. -> the rows, comparisons, decomposition (JSON-ready)."""
    rng = np.random.default_rng(seed)
    cfgs = plan_["configs"]
    errs = {k: [f["test_error"] for f in results[k].final] for k in results}
    losses = {k: [f["test_loss"] for f in results[k].final] for k in results}
    curves, rows = {}, []
    for name, c in plan_["curves"].items():
        cx = [flops(cfgs[k], k[1], k[2]) for k in c["compute"]]
        try:
            comp = Curve(cx, [errs[k] for k in c["compute"]], n_boot, rng)
            data = Curve([k[1] for k in c["data"]], [errs[k] for k in c["data"]], n_boot, rng)
        except ValueError as e:
            raise UserError(f"recipe {name}: cannot fit its curve: {e}") from None
        curves[name] = (comp, data)
        full = c["compute"][-1]
        rows.append({"recipe": name, "n_train": c["n_train"], "passes": c["passes"], "seeds": len(errs[full]),
                     "test_error": float(np.mean(errs[full])),
                     "test_error_std": float(np.std(errs[full], ddof=1)) if len(errs[full]) > 1 else 0.0,
                     "test_loss": float(np.mean(losses[full])), "train_flops": float(comp.x[-1]),
                     "compute_fit": comp.params(), "data_fit": data.params(),
                     "compute_points": [{"flops": float(x), "passes": k[2], "test_error": float(m), "std": float(s)}
                                        for x, k, m, s in zip(comp.x, c["compute"], comp.mean, comp.std)],
                     "data_points": [{"n_train": int(x), "test_error": float(m), "std": float(s)}
                                     for x, m, s in zip(data.x, data.mean, data.std)]})
    comparisons = []
    refs = [r for r in reference if r in curves]
    for ref in refs:
        for name in curves:
            if name == ref:
                continue
            (ca, da), (cb, db) = curves[ref], curves[name]
            comparisons.append({"over": ref, "recipe": name, "compute": compare(ca, cb), "data": compare(da, db)})
    for row in rows:  # the headline columns: at the recipe's full budget / full data, over each reference
        for cmp_ in comparisons:
            if cmp_["recipe"] == row["recipe"]:
                row[f"compute_x_over_{cmp_['over']}"] = cmp_["compute"]["at"][-1]
                row[f"data_x_over_{cmp_['over']}"] = cmp_["data"]["at"][-1]
                row[f"slope_vs_{cmp_['over']}"] = cmp_["compute"]["verdict"]
    dec = None
    if plan_["decompose"]:
        d = plan_["decompose"]
        dec = {"algorithms": d["algorithms"], **decompose(d["cells"], errs, n_boot, rng)}
        a, b = d["algorithms"]
        ats = next((c["compute"]["at"] for c in comparisons if c["over"] == a and c["recipe"] == b), None)
        finite = [m for m in ats or [] if math.isfinite(m["multiplier"])]
        if finite:  # at B's largest budget whose error A's curve reaches (above it: beyond A's floor)
            m = finite[-1]
            dec["doubling_months"] = doubling_months(m["multiplier"])
            dec["doubling_months_ci"] = [doubling_months(m["ci"][1]), doubling_months(m["ci"][0])]
            dec["doubling_at"] = {"flops": m["x"], "multiplier": m["multiplier"], "ci": m["ci"],
                                  "largest_budget": m is ats[-1], "extrapolated": m["extrapolated"]}
            dec["published"] = [{"what": w, "doubling_months": v} for w, v in PUBLISHED]
    return {"rows": rows, "comparisons": comparisons, "decomposition": dec, "n_boot": n_boot}


def run_progress(recipes, seeds=4, budgets=None, sizes=None, decompose_=DECOMPOSE, out=None, resume=False,
                 jobs=2, smoke=False, n_boot=300, log=print):
    from .pool import run_configs
    dec = decompose_ if decompose_ and all(r in recipes for r in decompose_) else None
    p = plan(recipes, seeds, budgets, sizes, dec, smoke)
    log(f"progress: {len(recipes)} recipes ({', '.join(recipes)}), {len(p['configs'])} runs of {seeds} seeds")
    describe = lambda k, res: (f"{k[0]} n={k[1]} passes={k[2]}: test error "  # noqa: E731
                               f"{np.mean([f['test_error'] for f in res.final]):.2f}% ({res.seconds:.1f} s)")
    results = run_configs(p["configs"], out, resume, jobs, log, describe, label="progress runs")
    bad = [k for k, r in results.items() if r.status != "finished"]
    if bad:
        raise UserError(f"progress: {len(bad)} runs did not finish ({bad[0][0]} n={bad[0][1]} passes={bad[0][2]}: "
                        f"{results[bad[0]].message}); rerun with --resume")
    ref = tuple(r for r in ("rung1", "rung5") if r in recipes) or (recipes[0],)
    return p, results, analyse(p, results, ref, n_boot)


# ---------------------------------------------------------------- output

def _x(m) -> str:
    if m is None:
        return "-"
    if m["beyond_floor"]:
        return "beyond floor"
    lo, hi = m["ci"]
    hi_s = "inf" if not math.isfinite(hi) else f"{hi:.3g}"
    return f"{m['multiplier']:.3g}x [{lo:.3g}, {hi_s}]" + (" (extrap.)" if m["extrapolated"] else "")


def table_rows(summary: dict) -> list[list[str]]:
    out = []
    for r in summary["rows"]:
        f = r["compute_fit"]
        out.append([r["recipe"], str(r["passes"]), f"{r['test_error']:.2f} +- {r['test_error_std']:.2f}",
                    _x(r.get("compute_x_over_rung1")), _x(r.get("data_x_over_rung1")),
                    _x(r.get("compute_x_over_rung5")),
                    f"{f['alpha']:.2f} [{f['alpha_ci'][0]:.2f}, {f['alpha_ci'][1]:.2f}]",
                    f"{f['floor']:.2f} [{f['floor_ci'][0]:.2f}, {f['floor_ci'][1]:.2f}]"])
    return out


HEADER = ["recipe", "passes", "test error %", "compute x over rung1", "data x over rung1", "compute x over rung5",
          "alpha [95% CI]", "floor % [95% CI]"]


def format_table(summary: dict) -> str:
    from ..report.console import render, table
    lines = [render(table(HEADER, table_rows(summary)))]
    d = summary.get("decomposition")
    if d:
        a, b = d["algorithms"]
        lines.append(f"\ndecomposition of the drop {d['from_error']:.2f}% -> {d['to_error']:.2f}% "
                     f"({a} at n/4 and 1/4 of its passes -> {b} at n and its passes), Shapley values:")
        for f in FACTORS:
            s = d[f]
            lines.append(f"  {f:9s} {s['points']:+.2f} points [{s['points_ci'][0]:+.2f}, {s['points_ci'][1]:+.2f}]"
                         f"  share {100 * s['share']:.0f}% [{100 * s['share_ci'][0]:.0f}, {100 * s['share_ci'][1]:.0f}]")
        if "doubling_months" in d:
            lo, hi = d["doubling_months_ci"]
            at = d["doubling_at"]
            where = (f"at {b}'s full budget" if at["largest_budget"] else
                     f"at {at['flops']:.2g} FLOPs, {b}'s largest budget whose error {a} reaches (above it {b} is "
                     f"beyond {a}'s floor, an infinite multiplier)")
            lines.append(f"  {b} over {a}: {at['multiplier']:.3g}x the compute {where}; over {START} that is a doubling "
                         f"every {d['doubling_months']:.0f} months [{'0 (unbounded)' if lo == 0 else f'{lo:.0f}'}, "
                         f"{hi:.0f}]; published: " +
                         "; ".join(f"{p['what']}: {p['doubling_months']:.0f}" for p in d["published"]))
    return "\n".join(lines)


def plots(summary: dict, folder) -> list:
    from ..report.plots import _plt
    plt = _plt()
    if plt is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for what, key, xlabel in (("compute", "compute_points", "training FLOPs a replica"),
                              ("data", "data_points", "training digits")):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for r in summary["rows"]:
            pts = r[key]
            x = np.array([p["flops" if what == "compute" else "n_train"] for p in pts], float)
            y = np.array([p["test_error"] for p in pts])
            s = np.array([p["std"] for p in pts])
            line = ax.errorbar(x, y, yerr=s, fmt="o", capsize=3, label=r["recipe"], alpha=0.85)
            f = r[f"{what}_fit"]
            x0 = float(np.exp(np.mean(np.log(x))))
            xs = np.geomspace(x.min(), x.max(), 60)
            ax.plot(xs, _predict((f["floor"], f["amplitude"], f["alpha"]), xs, x0), "-",
                    color=line[0].get_color(), alpha=0.7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel + " (log)")
        ax.set_ylabel("test error % (mean +- std over seeds; log)")
        ax.set_title(f"{what} curves: power law with a floor fitted to each recipe")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = folder / f"{what}_curves.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    comps = [c for c in summary["comparisons"] if c["over"] == summary["comparisons"][0]["over"]] \
        if summary["comparisons"] else []
    if comps:
        fig, ax = plt.subplots(figsize=(8, 5))
        names, ms, lo, hi = [], [], [], []
        for c in comps:
            m = c["compute"]["at"][-1]
            if not math.isfinite(m["multiplier"]):
                continue
            names.append(c["recipe"])
            ms.append(m["multiplier"])
            lo.append(m["multiplier"] - m["ci"][0])
            hi.append((m["ci"][1] if math.isfinite(m["ci"][1]) else 10 * m["multiplier"]) - m["multiplier"])
        if names:
            ax.errorbar(range(len(names)), ms, yerr=[lo, hi], fmt="o", capsize=4)
            ax.set_xticks(range(len(names)), names)
            ax.set_yscale("log")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_ylabel(f"effective-compute multiplier over {comps[0]['over']} (95% CI; log)")
            ax.set_title("what each recipe is worth in compute, at its own full budget")
            ax.grid(alpha=0.3, which="both")
            fig.tight_layout()
            p = folder / "multipliers.png"
            fig.savefig(p, dpi=110)
            paths.append(p)
        plt.close(fig)
    return paths
