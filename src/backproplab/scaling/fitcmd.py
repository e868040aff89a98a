"""`scale fit` on a study's store: load the runs, fit everything (report.fit_report), keep
a compact summary (printed, --json, in the store as a 'scale_fit' record, and beside the
plots as JSON with the full report), and the text a user reads."""
import json
import math
from pathlib import Path

from ..engine.checkpoint import atomic_write_bytes
import numpy as np

from ..errors import UserError
from ..report.console import render, table
from ..store import DB_NAME, add_run, is_url, where
from .fit import FORMS as FORM_LABELS
from .report import fit_report, jsonable
from .runs import load_runs_from_store


def summarize(rep: dict) -> dict:
    """The numbers a reader wants from fit_report's output, each with its 95% interval."""
    fams = {}
    for fam, f in rep["fits"].items():
        if "frontier" not in f:
            fams[fam] = {"n_runs": f.get("n_runs"), "why_no_fit": f.get("why_no_fit")}
            continue
        fr, ch, iso, lr, ex = f["frontier"], f["chinchilla"], f["isoflop"], f["lr"], f["extrapolation"]
        s = {"n_runs": f["n_runs"], "n_cells": f["n_cells"], "flops_model": f["flops_model"],
             "frontier": {k: fr[k] for k in ("slope", "slope_ci", "intercept", "intercept_ci", "C_ref",
                                             "loss_at_C_ref", "loss_at_C_ref_ci", "why_no_fit")}}
        if "constants" in ch:
            s["chinchilla"] = {"constants": ch["constants"], "intervals": ch["intervals"],
                               "compute_optimal": ch["compute_optimal"], "n_boot": ch["n_boot"]}
        else:
            s["chinchilla"] = ch
        for form in ("chinchilla_repeated", "chinchilla_overfit"):
            if form in f:
                s[form] = {k: f[form][k] for k in ("form", "constants", "intervals", "n_boot")}
        s["isoflop"] = {name: {"exponent": p["exponent"], "exponent_ci": p["exponent_ci"],
                               "n_valid_bins": p["n_valid_bins"], "why_no_fit": p["why_no_fit"]}
                        for name, p in iso["profiles"].items()}
        s["best_lr"] = {"table": [{k: r[k] for k in ("N", "n_train", "epochs", "best_lr", "loss", "at_edge")}
                                  for r in lr["table"]], "fit": lr["fit"]}
        s["extrapolation"] = ex
        fams[fam] = s
    return jsonable({"source": rep["source"], "n_runs": rep["n_runs"], "families": fams,
                     "comparisons": rep["comparisons"], "plots": rep["plots"], "seconds": rep["seconds"]})


def _source(db):
    """A store argument -> (what to read: runs.db's path or the URL; the folder plots go to by default)."""
    if is_url(db):
        return db, Path("scaling")                 # a server store: ./scaling unless --out
    path = Path(db)
    if path.is_dir():
        path = path / DB_NAME
    return path, path.parent / "scaling"


def fit_store(db, out=None, *, n_boot=1000, seed=0, recipe=None, by_seed=False) -> dict:
    """`scale fit STORE`: STORE a folder, its runs.db, or a server store's URL (the summary is
    recorded in that store as a 'scale_fit' run; plots and the full report go to out)."""
    path, default_out = _source(db)
    runs = load_runs_from_store(path, require_chinchilla=True, recipe=recipe)
    by_seed = heldout_by_seed(path, recipe=recipe) if by_seed else None   # first: it refuses a 1-seed store
    out = Path(out) if out else default_out
    rep = fit_report(runs, out, n_boot=n_boot, seed=seed)
    summary = summarize(rep)
    summary["seeds_per_run"] = {str(k): v for k, v in sorted(runs.info.get("seeds", {}).items())}
    summary["seed_spread"] = seed_spread_summary(runs.info.get("seed_spread") or [], summary)
    summary["validation"] = runs.info.get("validation")
    if by_seed:
        summary["by_seed"] = by_seed
    summary["report"] = str(out / "scaling_report.json")
    atomic_write_bytes(out / "scaling_report.json", json.dumps(rep, indent=1, sort_keys=True).encode())
    if is_url(path) or path.name == DB_NAME:                  # the summary table goes into the store too
        summary["store_record"] = add_run(path if is_url(path) else path.parent, "scale_fit", "scale-fit", "finished",
                                          {"n_boot": n_boot, "seed": seed, "out": str(out)}, summary, [], {})
    return summary


def fit_csv(csv_path, out=None, *, n_boot=1000, seed=0) -> dict:
    """`scale fit --csv FILE`: anyone's runs (scaling/csvruns.py) through the same fits; the
    plots and the full report go to out (default: a 'scaling' folder beside the file)."""
    from .csvruns import load_runs_from_csv
    runs = load_runs_from_csv(csv_path)
    out = Path(out) if out else Path(csv_path).expanduser().parent / "scaling"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror or e}") from None
    rep = fit_report(runs, out, n_boot=n_boot, seed=seed)
    summary = summarize(rep)
    summary.update({k: runs.info[k] for k in ("derived", "ignored_columns")})
    summary["report"] = str(out / "scaling_report.json")
    atomic_write_bytes(out / "scaling_report.json", json.dumps(rep, indent=1, sort_keys=True).encode())
    return summary


def _seed_counts(S: int):
    """Every resample of S seeds with replacement, as (counts per seed, probability): the exact
    bootstrap distribution (10 distinct resamples of 3 seeds, not 27 draws)."""
    def parts(n, k):
        if k == 1:
            yield (n,)
            return
        for i in range(n, -1, -1):
            for rest in parts(n - i, k - 1):
                yield (i,) + rest
    for c in parts(S, S):
        yield c, math.factorial(S) / math.prod(math.factorial(x) for x in c) / S ** S


def _weighted_ci(values, probs):
    """2.5% and 97.5% quantiles of a discrete distribution (values with probabilities)."""
    v, p = np.asarray(values, dtype=float), np.asarray(probs, dtype=float)
    o = np.argsort(v, kind="stable")
    cum = np.cumsum(p[o]) / p.sum()
    return [float(v[o][np.searchsorted(cum, q - 1e-12)]) for q in (0.025, 0.975)]


def heldout_by_seed(db, *, recipe=None, holdout_frac=0.1, grid="coarse") -> dict:
    """The extrapolation check with seeds as the unit. A study of S seeds per cell is fitted
    (every form, n_boot = 0) on each seed alone (fit seed k's cells, predict seed k's held-out
    cells) and on every resample of the seeds with replacement, each resample's cells being the
    mean of its seeds (the exact bootstrap distribution over seeds, with its probabilities).
    Per family and form: the error on the seed mean, each seed's, their mean with a t interval,
    and the bootstrap's 95% interval; the same for the form each fit chooses on its own
    validation fold (fit.choose_form), which never sees the held-out cells."""
    from .report import extrapolation_check, flops_model
    from .runs import best_per_cell
    path = _source(db)[0]
    base = load_runs_from_store(path, require_chinchilla=True, recipe=recipe)
    seeds = {int(k) for k in base.info.get("seeds", {})}
    if base.chosen.any() and best_per_cell(base).chosen.all():
        seeds = {max(seeds)}    # rates swept on fewer seeds: every cell's chosen rate carries all of them
    if len(seeds) != 1 or min(seeds) < 2:
        raise UserError(f"--by-seed needs every cell trained with the same number (>= 2) of seeds; "
                        f"{where(path)} has runs of {', '.join(str(k) for k in sorted(seeds))} seed(s)")
    S = seeds.pop()
    rows = []                                             # (counts, probability, family -> extrapolation)
    for counts, prob in _seed_counts(S):
        runs = load_runs_from_store(path, require_chinchilla=True, recipe=recipe, seed_weights=counts)
        per = {}
        for fam in runs.families():
            sub = runs.take(np.flatnonzero(runs.family == fam))
            fm = flops_model(best_per_cell(sub))
            try:
                per[fam] = extrapolation_check(sub, holdout_frac, n_boot=0, grid=grid, k=fm["k"], gamma=fm["gamma"])
            except UserError as e:
                per[fam] = {"why_no_fit": str(e)}
        rows.append((counts, prob, per))
    one = [r for r in rows if max(r[0]) == S]             # each seed alone, in seed order
    one.sort(key=lambda r: r[0].index(S))
    mean_row = next(r for r in rows if set(r[0]) == {1}) if S > 1 else one[0]
    # scipy.stats only now: imported before the fits it loads a threaded BLAS ahead of the fit's
    # OPENBLAS_NUM_THREADS=1 (fit._minimize_from), and the fits ran ~3x slower on a busy machine
    from scipy.stats import t as student_t
    tq = float(student_t.ppf(0.975, S - 1))
    out = {"n_seeds": S, "n_resamples": len(rows), "holdout_frac": holdout_frac,
           "what": "mean |relative error| on the held-out cells of a fit on the other cells, n_boot 0 per fit",
           "families": {}}
    for fam in rows[0][2]:
        if "n_holdout" not in rows[0][2][fam]:
            out["families"][fam] = {"why_no_fit": rows[0][2][fam].get("why_no_fit")}
            continue
        forms = [k for k in ("chinchilla", "chinchilla_repeated", "chinchilla_overfit") if k in rows[0][2][fam]]
        fam_out = {"n_holdout": rows[0][2][fam]["n_holdout"], "forms": {}}

        def stats(err_of):
            per_seed = [err_of(r[2][fam]) for r in one]
            m, sd = float(np.mean(per_seed)), float(np.std(per_seed, ddof=1))
            return {"seed_mean_fit": err_of(mean_row[2][fam]), "per_seed": per_seed, "per_seed_mean": m,
                    "per_seed_sd": sd, "per_seed_t_ci": [m - tq * sd / math.sqrt(S), m + tq * sd / math.sqrt(S)],
                    "bootstrap_ci": _weighted_ci([err_of(r[2][fam]) for r in rows], [r[1] for r in rows])}
        for form in forms:
            fam_out["forms"][form] = {
                "mean_abs_rel_err": stats(lambda ex, f=form: ex[f]["mean_abs_rel_err"]),
                "max_abs_rel_err": stats(lambda ex, f=form: ex[f]["max_abs_rel_err"])}
        if "form_choice" in rows[0][2][fam]:
            chosen = lambda ex: ex["form_choice"]["chosen"]          # noqa: E731
            fam_out["chosen_form"] = {"per_seed": [chosen(r[2][fam]) for r in one],
                                      "seed_mean_fit": chosen(mean_row[2][fam]),
                                      "mean_abs_rel_err": stats(lambda ex: ex[chosen(ex)]["mean_abs_rel_err"])}
        out["families"][fam] = fam_out
    return jsonable(out)


def by_seed_lines(b: dict) -> list[str]:
    lines = [f"\nheld-out error with seeds as the unit ({b['n_seeds']} seeds; fits on the seed mean, on each seed "
             f"alone, and on the {b['n_resamples']} resamples of the seeds with replacement):"]
    for fam, f in b["families"].items():
        if "forms" not in f:
            lines.append(f"  {fam}: {f.get('why_no_fit')}")
            continue
        rows = []
        entries = [(FORM_LABELS[k], v["mean_abs_rel_err"], v["max_abs_rel_err"]) for k, v in f["forms"].items()]
        if "chosen_form" in f:
            entries.append(("chosen on validation", f["chosen_form"]["mean_abs_rel_err"], None))
        for label, m, w in entries:
            rows.append([label, f"{100 * m['seed_mean_fit']:.1f}%",
                         " ".join(f"{100 * v:.1f}" for v in m["per_seed"]),
                         f"{100 * m['per_seed_mean']:.1f}% [{100 * m['per_seed_t_ci'][0]:.1f}, "
                         f"{100 * m['per_seed_t_ci'][1]:.1f}]",
                         f"[{100 * m['bootstrap_ci'][0]:.1f}, {100 * m['bootstrap_ci'][1]:.1f}]",
                         "" if w is None else f"{100 * w['seed_mean_fit']:.1f}%"])
        lines.append(f"  {fam}: {f['n_holdout']} held-out cells; mean |error| of")
        lines += _indented(table(["form", ("seed mean", "right"), "each seed", "per-seed mean [t 95%]",
                                  "bootstrap 95%", ("worst (seed mean)", "right")], rows))
        if "chosen_form" in f:
            c = f["chosen_form"]
            lines.append(f"    chosen on the validation fold: {c['seed_mean_fit']} (seed mean), "
                         f"{', '.join(c['per_seed'])} (each seed)")
    return lines


def seed_spread_summary(cells: list, summary: dict) -> dict:
    """Seed-to-seed spread of the cells' losses (relative sd at the chosen rate, from records of
    several seeds), over all cells and over the extrapolation check's held-out ones (C at or
    above its threshold), to read the misses against."""
    out = {"n_cells": len(cells)}
    if not cells:
        return out
    rel = [c["rel_sd"] for c in cells]
    out.update({"mean_rel_sd": sum(rel) / len(rel), "max_rel_sd": max(rel)})
    for fam, f in summary["families"].items():
        thr = (f.get("extrapolation") or {}).get("C_threshold")
        ho = [c["rel_sd"] for c in cells if c["family"] == fam and thr is not None and c["C"] >= thr]
        if ho:
            out.setdefault("held_out", {})[fam] = {"n_cells": len(ho), "mean_rel_sd": sum(ho) / len(ho),
                                                   "max_rel_sd": max(ho)}
    return out


# -- text --------------------------------------------------------------------------------
def _indented(t, by: int = 4) -> list[str]:
    return [" " * by + line for line in render(t).splitlines()]


def _num(v, fmt=".4g"):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _with_ci(v, ci, fmt=".4g"):
    lo, hi = (ci or [None, None])[:2]
    return f"{_num(v, fmt)} [{_num(lo, fmt)}, {_num(hi, fmt)}]"


def fit_text(s: dict) -> str:
    lines = [f"scale fit: {s['n_runs']} runs from {s['source']} (95% bootstrap intervals in brackets)"]
    if s.get("validation"):
        lines.append(f"  losses are validation losses on {s['validation']}")
    for d in s.get("derived") or []:
        lines.append(f"  computed: {d} (the file gave only one of D and C)")
    if s.get("ignored_columns"):
        lines.append(f"  ignored columns: {', '.join(s['ignored_columns'])}")
    seeds = s.get("seeds_per_run") or {}
    if set(seeds) - {"1"}:
        lines.append("  each run's loss is the mean over its seeds: " + ", ".join(
            f"{v} runs of {k} seed{'s' if k != '1' else ''}" for k, v in seeds.items()))
    sp = s.get("seed_spread") or {}
    if sp.get("n_cells"):
        lines.append(f"  seed-to-seed spread of a cell's loss (sd / mean at its rate): {100 * sp['mean_rel_sd']:.1f}% "
                     f"on average, {100 * sp['max_rel_sd']:.1f}% at most ({sp['n_cells']} cells)" + "".join(
                         f"; held-out {fam} cells {100 * h['mean_rel_sd']:.1f}% (at most {100 * h['max_rel_sd']:.1f}%)"
                         for fam, h in (sp.get("held_out") or {}).items()))
    for fam, f in s["families"].items():
        lines.append(f"\n== {fam}: {f.get('n_cells', '?')} cells, {f['n_runs']} runs")
        if "frontier" not in f:
            lines.append(f"  no fit: {f['why_no_fit']}")
            continue
        fr = f["frontier"]
        lines.append(f"  frontier  log L = intercept + slope log C:  slope {_with_ci(fr['slope'], fr['slope_ci'])}"
                     f"  intercept {_with_ci(fr['intercept'], fr['intercept_ci'])}")
        ch = f["chinchilla"]
        if "constants" in ch:
            c, ci = ch["constants"], ch["intervals"]
            lines.append("  Chinchilla  L = E + A/N^alpha + B/D^beta:  " + "  ".join(
                f"{k} {_with_ci(c[k], ci.get(k))}" for k in ("E", "A", "B", "alpha", "beta")))
            co = ch["compute_optimal"]
            lines.append(f"  compute-optimal (C = {co['k']:.3g} N^{co['gamma']:.3f} D):  N* ~ C^"
                         f"{_with_ci(co['N_opt_exponent'], ci.get('N_opt_exponent'), '.3f')}  D* ~ C^"
                         f"{_with_ci(co['D_opt_exponent'], ci.get('D_opt_exponent'), '.3f')}")
        else:
            lines.append(f"  Chinchilla: not fitted ({ch.get('why_no_fit')})")
        if "chinchilla_repeated" in f:
            c, ci = f["chinchilla_repeated"]["constants"], f["chinchilla_repeated"]["intervals"]
            lines.append("  repeated data  L = E + A/N^alpha + B/D_eff^beta, D_eff = U_s (1 + R* (1 - exp(-R/R*))):")
            lines.append("    " + "  ".join(f"{k} {_with_ci(c[k], ci.get(k))}"
                                           for k in ("E", "A", "B", "alpha", "beta", "R_star")))
        if "chinchilla_overfit" in f:
            c, ci = f["chinchilla_overfit"]["constants"], f["chinchilla_overfit"]["intervals"]
            lines.append("  overfitting  L = E + A/N^alpha + B/D_eff^beta + G epochs^omega (D_eff as above):")
            lines.append("    " + "  ".join(f"{k} {_with_ci(c[k], ci.get(k))}"
                                           for k in ("E", "A", "B", "alpha", "beta", "R_star", "G", "omega")))
        iso = "  ".join(f"{k}_opt ~ C^{_with_ci(p['exponent'], p['exponent_ci'], '.3f')}" if p["exponent"] is not None
                        else f"{k}_opt: {p['why_no_fit']}" for k, p in f["isoflop"].items())
        lines.append(f"  IsoFLOP profiles:  {iso}")
        lr = f["best_lr"]
        if lr["table"]:
            lines.append("  best learning rate per cell (* = at the edge of the rates tried):")
            sizes = sorted({r["N"] for r in lr["table"]})
            eps = sorted({r["epochs"] for r in lr["table"] if r["epochs"] is not None})
            rows = []
            for N in sizes:
                # n_train: the stored training-set size, or D / epochs in stores without it (a few
                # examples off where epochs x n was rounded)
                top = max(x["n_train"] or 0 for x in lr["table"] if x["N"] == N)
                row = {r["epochs"]: r for r in lr["table"] if r["N"] == N and (r["n_train"] or 0) >= 0.999 * top}
                rows.append([f"{N:.0f}"] + [f"{row[e]['best_lr']:.4g}{'*' if row[e]['at_edge'] else ' '}"
                                            if e in row else "" for e in eps])
            lines += _indented(table([("N \\ epochs", "right")] + [(f"{e:g}", "right") for e in eps], rows))
            lines.append("    (largest training set of each size)")
            fit = lr["fit"]
            if "epochs_exponent" in fit:
                lines.append(f"    fit: lr* ~ epochs^{_with_ci(fit['epochs_exponent'], fit['epochs_exponent_ci'], '.3f')}"
                             + (f" N^{_with_ci(fit['N_exponent'], fit['N_exponent_ci'], '.3f')}"
                                if "N_exponent" in fit else ""))
            elif fit.get("why_no_fit"):
                lines.append(f"    fit: {fit['why_no_fit']}")
        lines += _extrapolation_lines(f["extrapolation"])
    for c in s["comparisons"]:
        a, b = c["families"]
        r, ci = c["loss_ratio_b_over_a"][1], c["loss_ratio_ci"][1]
        lines.append(f"\n{b} vs {a} at equal compute (C = {c['C'][1]:.3g}): loss ratio {_with_ci(r, ci, '.3f')}; "
                     f"{c['verdict']}")
    if s.get("by_seed"):
        lines += by_seed_lines(s["by_seed"])
    if s["plots"]:
        lines.append("\nplots: " + ", ".join(v for v in s["plots"].values() if v))
    if s.get("report"):
        lines.append(f"full report: {s['report']}")
    return "\n".join(lines)


def _extrapolation_lines(ex: dict) -> list[str]:
    if not ("chinchilla" in ex and "runs" in ex["chinchilla"]):
        return [f"  extrapolation: {ex.get('why_no_fit') or ex.get('chinchilla', {}).get('why_no_fit')}"]
    lines = [f"  extrapolation: fit on {ex['n_fit']} cells, predict the {ex['n_holdout']} of largest "
             f"compute (C >= {ex['C_threshold']:.3g})"]
    forms = [("L(N, D)", "chinchilla"), ("repeated data", "chinchilla_repeated"), ("overfitting", "chinchilla_overfit")]
    e = {key: ex[key] for _, key in forms if "runs" in ex.get(key, {})}
    choice = ex.get("form_choice") or {}
    for label, key in forms:
        if key in e:
            v = (choice.get("forms") or {}).get(key, {}).get("mean_abs_rel_err")
            lines.append(f"    {label + ':':15s}mean |error| {100 * e[key]['mean_abs_rel_err']:.1f}%, max "
                         f"{100 * e[key]['max_abs_rel_err']:.1f}% ({'within' if e[key]['within_5pct'] else 'outside'} 5%)"
                         + ("" if v is None else f"; on the validation fold {100 * v:.1f}%")
                         + ("  <- chosen" if choice.get("chosen") == key else ""))
    if choice.get("chosen"):
        lines.append(f"    chosen without the held-out cells: {choice['rule']}")
    rep = e.get("chinchilla_repeated")
    ovf = e.get("chinchilla_overfit")
    for i, r in enumerate(e["chinchilla"]["runs"]):
        ep = f"  epochs {r['epochs']:g}" if r.get("epochs") is not None else ""
        line = (f"    N {r['N']:8.0f}  D {r['D']:8.0f}{ep}  loss {r['loss']:.4f}  predicted "
                f"{_with_ci(r['pred'], r['pred_ci'])} ({100 * r['rel_err']:+.1f}%)")
        if rep:
            q = rep["runs"][i]
            line += f"  repeated-data form {_with_ci(q['pred'], q['pred_ci'])} ({100 * q['rel_err']:+.1f}%)"
        if ovf:
            q = ovf["runs"][i]
            line += f"  overfitting form {_with_ci(q['pred'], q['pred_ci'])} ({100 * q['rel_err']:+.1f}%)"
        lines.append(line)
    return lines


def synthetic_text(r: dict) -> str:
    lines = [f"scale fit --synthetic: {r['n_runs']} runs from known constants, log-normal noise sigma "
             f"{r['noise_sigma_log']}, {r['n_boot']} bootstrap resamples"]
    rows = [(name, f"{p['true']:.4g}", f"{p['fit']:.4g}", f"[{_num(p['ci'][0])}, {_num(p['ci'][1])}]",
             "yes" if p["inside"] else "NO") for name, p in r["params"].items()]
    lines += _indented(table(["", ("true", "right"), ("fitted", "right"), "95% interval", "inside"], rows), 2)
    iso = r["isoflop_N_opt_exponent"]
    lines.append(f"  IsoFLOP N_opt exponent: true {iso['true']:.4f}, fitted {_with_ci(iso['fit'], iso['ci'])}")
    e = r["errors"]
    lines.append(f"  errors: alpha {e['alpha_abs']:.4f}, beta {e['beta_abs']:.4f}, E {100 * e['E_rel']:.2f}% -> target "
                 f"(0.02, 0.02, 2%) {'met' if r['target_met'] else 'NOT met'}")
    return "\n".join(lines)
