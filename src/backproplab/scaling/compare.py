"""`scale fit DIR --compare A,B`: do two recipes differ in exponent or only in constant?

A store may hold studies of several recipes (`scale run` and `scale run +method=NAME` into one
--out). Each recipe's cells are fitted apart (runs.load_runs_from_store(recipe=...)), family by
family, with the Chinchilla form L = E + A/N^alpha + B/D^beta and its bootstrap refits; the
differences B - A of alpha, beta, E, A, B get 95% intervals from pairing the two recipes'
independent bootstrap draws (percentiles of the draw-by-draw differences; A and B, the
amplitudes, as log ratios). Beside it, the compute frontiers' loss ratio at equal compute
(report.compare_frontiers). Verdict: "exponents differ" when the interval of alpha's or beta's
difference excludes 0; "only constants differ" when the exponents' intervals hold 0 but one of
E, A, B's excludes it; else "no difference resolved".
"""
import numpy as np

from ..errors import UserError
from .fit import _percentile_ci, fit_chinchilla
from .report import compare_frontiers, jsonable
from .runs import Runs, best_per_cell, load_runs_from_store, store_recipes

EXPONENTS = ("alpha", "beta")
CONSTANTS = ("E", "A", "B")


def parse_compare(text) -> list[str]:
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if len(names) != 2 or names[0] == names[1]:
        raise UserError(f"--compare {text!r}: name two different recipes, e.g. base,sam")
    return names


def _diff(fa, fb, name):
    """Point difference and 95% interval of b - a (log ratio for the amplitudes A and B)."""
    log = name in ("A", "B")
    pa, pb = fa.params[name], fb.params[name]
    da = np.array([fa._derived(t)[name] for t in fa.boot if np.isfinite(t).all()])
    db = np.array([fb._derived(t)[name] for t in fb.boot if np.isfinite(t).all()])
    n = min(len(da), len(db))
    if n < 20:
        return {"diff": float(np.log(pb / pa) if log else pb - pa), "ci": [np.nan, np.nan], "n_boot": n,
                "log_ratio": log}
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = np.log(db[:n] / da[:n]) if log else db[:n] - da[:n]
    lo, hi = _percentile_ci(d[np.isfinite(d)])
    return {"diff": float(np.log(pb / pa) if log else pb - pa), "ci": [float(lo), float(hi)], "n_boot": n,
            "log_ratio": log}


def compare_fits(ra: Runs, rb: Runs, labels, *, n_boot=1000, seed=0) -> dict:
    """Two recipes' runs of one family -> each one's constants with intervals, the differences, the
    frontier comparison and the verdict."""
    ca, cb = best_per_cell(ra), best_per_cell(rb)
    fits = [fit_chinchilla(c.N, c.D, c.loss, n_boot=n_boot, seed=seed + i) for i, c in enumerate((ca, cb))]
    fa, fb = fits
    diffs = {k: _diff(fa, fb, k) for k in EXPONENTS + CONSTANTS}

    def excludes0(k):
        lo, hi = diffs[k]["ci"]
        return bool(np.isfinite([lo, hi]).all() and (lo > 0 or hi < 0))
    if any(excludes0(k) for k in EXPONENTS):
        verdict = "exponents differ"
    elif any(excludes0(k) for k in CONSTANTS):
        verdict = "only constants differ (exponents agree within their intervals)"
    else:
        verdict = "no difference resolved (every interval holds 0)"
    both = Runs(**{f: np.concatenate([getattr(ra, f), getattr(rb, f)]) for f in ("N", "D", "C", "loss", "lr", "epochs",
                                                                               "U")},
                family=np.array([labels[0]] * len(ra) + [labels[1]] * len(rb), dtype=object))
    frontier = compare_frontiers(both, labels[0], labels[1], n_boot=n_boot, seed=seed)
    return jsonable({"recipes": list(labels), "n_runs": [len(ra), len(rb)],
                     "fits": {lab: {"constants": f.params, "intervals": f.intervals()} for lab, f in zip(labels, fits)},
                     "differences": diffs, "verdict": verdict, "frontier": frontier})


def compare_store(db, labels, *, n_boot=1000, seed=0) -> dict:
    """Every family both recipes have in the store, compared."""
    have = store_recipes(db)
    missing = [lab for lab in labels if lab not in have]
    if missing:
        raise UserError(f"no scale runs of recipe {', '.join(missing)} in {db} "
                        f"(recipes there: {', '.join(sorted(have)) or 'none'})")
    ra, rb = (load_runs_from_store(db, recipe=lab, require_chinchilla=True) for lab in labels)
    fams = sorted(set(ra.families()) & set(rb.families()))
    if not fams:
        raise UserError(f"recipes {labels[0]} and {labels[1]} share no model family "
                        f"({', '.join(ra.families())} vs {', '.join(rb.families())})")
    out = {"recipes": list(labels), "families": {}}
    for fam in fams:
        pick = [r.take(np.flatnonzero(r.family == fam)) for r in (ra, rb)]
        out["families"][fam] = compare_fits(*pick, labels, n_boot=n_boot, seed=seed)
    return out


def compare_text(rep: dict) -> str:
    from ..report.console import render, table
    a, b = rep["recipes"]
    lines = []
    for fam, c in rep["families"].items():
        rows = []
        for k in EXPONENTS + CONSTANTS:
            va, vb = (c["fits"][lab]["constants"][k] for lab in (a, b))
            ia, ib = (c["fits"][lab]["intervals"].get(k, [np.nan, np.nan]) for lab in (a, b))
            d = c["differences"][k]
            rows.append([k, f"{va:.4g} [{ia[0]:.3g}, {ia[1]:.3g}]", f"{vb:.4g} [{ib[0]:.3g}, {ib[1]:.3g}]",
                         f"{d['diff']:+.3g} [{d['ci'][0]:+.3g}, {d['ci'][1]:+.3g}]" + (" (log ratio)" if d["log_ratio"]
                                                                                      else "")])
        lines.append(f"family {fam}: {a} ({c['n_runs'][0]} runs) vs {b} ({c['n_runs'][1]} runs): {c['verdict']}")
        lines.append(render(table(["constant", f"{a} [95% CI]", f"{b} [95% CI]", f"{b} - {a} [95% CI]"], rows)))
        lines.append(f"  frontier: {c['frontier']['verdict']}")
    return "\n".join(lines)
