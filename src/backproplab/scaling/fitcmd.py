"""`scale fit` on a study's store: load the runs, fit everything (report.fit_report), keep
a compact summary (printed, --json, in the store as a 'scale_fit' record, and beside the
plots as JSON with the full report), and the text a user reads."""
import json
import math
from pathlib import Path

from ..engine.checkpoint import atomic_write_bytes
from ..errors import UserError
from ..report.console import render, table
from ..store import DB_NAME, add_run
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
        if "chinchilla_repeated" in f:
            cr = f["chinchilla_repeated"]
            s["chinchilla_repeated"] = {k: cr[k] for k in ("form", "constants", "intervals", "n_boot")}
        s["isoflop"] = {name: {"exponent": p["exponent"], "exponent_ci": p["exponent_ci"],
                               "n_valid_bins": p["n_valid_bins"], "why_no_fit": p["why_no_fit"]}
                        for name, p in iso["profiles"].items()}
        s["best_lr"] = {"table": [{k: r[k] for k in ("N", "n_train", "epochs", "best_lr", "loss", "at_edge")}
                                  for r in lr["table"]], "fit": lr["fit"]}
        s["extrapolation"] = ex
        fams[fam] = s
    return jsonable({"source": rep["source"], "n_runs": rep["n_runs"], "families": fams,
                     "comparisons": rep["comparisons"], "plots": rep["plots"], "seconds": rep["seconds"]})


def fit_store(db, out=None, *, n_boot=1000, seed=0, recipe=None) -> dict:
    path = Path(db)
    if path.is_dir():
        path = path / DB_NAME
    runs = load_runs_from_store(path, require_chinchilla=True, recipe=recipe)
    out = Path(out) if out else path.parent / "scaling"
    rep = fit_report(runs, out, n_boot=n_boot, seed=seed)
    summary = summarize(rep)
    summary["seeds_per_run"] = {str(k): v for k, v in sorted(runs.info.get("seeds", {}).items())}
    summary["seed_spread"] = seed_spread_summary(runs.info.get("seed_spread") or [], summary)
    summary["validation"] = runs.info.get("validation")
    summary["report"] = str(out / "scaling_report.json")
    atomic_write_bytes(out / "scaling_report.json", json.dumps(rep, indent=1, sort_keys=True).encode())
    if path.name == DB_NAME:                                  # the summary table goes into the store too
        summary["store_record"] = add_run(path.parent, "scale_fit", "scale-fit", "finished",
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
    forms = [("L(N, D)", "chinchilla"), ("repeated data", "chinchilla_repeated")]
    e = {key: ex[key] for _, key in forms if "runs" in ex.get(key, {})}
    for label, key in forms:
        if key in e:
            lines.append(f"    {label + ':':15s}mean |error| {100 * e[key]['mean_abs_rel_err']:.1f}%, max "
                         f"{100 * e[key]['max_abs_rel_err']:.1f}% ({'within' if e[key]['within_5pct'] else 'outside'} 5%)")
    rep = e.get("chinchilla_repeated")
    for i, r in enumerate(e["chinchilla"]["runs"]):
        ep = f"  epochs {r['epochs']:g}" if r.get("epochs") is not None else ""
        line = (f"    N {r['N']:8.0f}  D {r['D']:8.0f}{ep}  loss {r['loss']:.4f}  predicted "
                f"{_with_ci(r['pred'], r['pred_ci'])} ({100 * r['rel_err']:+.1f}%)")
        if rep:
            q = rep["runs"][i]
            line += f"  repeated-data form {_with_ci(q['pred'], q['pred_ci'])} ({100 * q['rel_err']:+.1f}%)"
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
