"""The report's sections: a registry of (name, title, has data?, render).

A section is one `register(Section(...))`: has_data(ctx) says whether the stores hold what it
shows (cheap, or cached in ctx for render), render(ctx, page) returns its HTML, drawing its
tables and figures through the page so each gets a number and a provenance entry. Order of
registration is the order on the page.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .html import draw, esc, fmt, pm


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    has_data: Callable
    render: Callable
    absent: str                      # why it is left out: what run would bring it in


SECTIONS: list[Section] = []


def register(s: Section) -> Section:
    if any(x.name == s.name for x in SECTIONS):
        raise ValueError(f"section {s.name!r} registered twice")
    SECTIONS.append(s)
    return s


def _mean_sd(vals):
    v = np.asarray([x for x in vals if x is not None], dtype=float)
    if len(v) == 0:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def _newest_per(runs, key):
    """The newest run (highest id, later stores win) of each key, in the order of first appearance."""
    out = {}
    for r in runs:
        out[key(r)] = r
    return list(out.values())


def _n_train(ctx, run):
    """Training examples the run trained on (the data re-read; None when its source is gone)."""
    d = (run.config.get("data") or {})
    data = ctx.dataset(d.get("source", "mnist10k"), d.get("n_train"), d.get("n_test"), d.get("val") or 0,
                       d.get("resolution", 16))
    return None if data is None else len(data.train_labels)


# -- the 1989 reproduction ---------------------------------------------------------------------
def repro_runs(ctx):
    return _newest_per(ctx.of("repro"), lambda r: (str(r.store), r.digest()))


def _setup(run) -> str:
    c = run.config
    t, d = c.get("train") or {}, c.get("data") or {}
    size = "" if d.get("n_train") is None and d.get("n_test") is None else \
        f", {d.get('n_train') or 'all'}/{d.get('n_test') or 'all'} digits"
    return f"{c.get('name', '?')}: {t.get('engine', '?')} engine, {t.get('passes', '?')} passes{size}"


def render_repro(ctx, page):
    from .console import PUBLISHED_1989
    head = ["", "setup", "seeds", "train error %", "train misses", "test error %", "test misses"]
    rows, attrs = [], []
    for name, tre, trm, tee, tem in PUBLISHED_1989:
        rows.append([name, "23 passes, per-example SGD", "1", f"{tre:.2f}", str(trm), f"{tee:.2f}", str(tem)])
        attrs.append({"class": "published", "data-published": name})
    runs = repro_runs(ctx)
    for r in runs:
        per = r.per_seed()
        cells = [pm(*_mean_sd([p.get(k) for p in per]), spec=".1f" if "misses" in k else ".2f")
                 for k in ("train_error", "train_misses", "test_error", "test_misses")]
        rows.append([f"this lab: run {r.id}" + ("" if r.status == "finished" else f" ({r.status})"), _setup(r),
                     str(len(per)), *cells])
        attrs.append({"data-run": r.id, "data-store": str(r.store)})
    intro = ("<p>The paper's network and training (9,760 weights, 23 passes of per-example SGD at 0.03 on "
             "7,291 digits, tested on 2,007) against the paper and the public 2022 reproduction, whose "
             "figures are one run on its own split. Ours: the canonical split of the embedded digits, "
             "mean ± sd over the seeds.</p>")
    return intro + page.table("1989 reproduction against the paper and the public reproduction", head, rows,
                              runs, attrs, ["", "", "num", "num", "num", "num", "num"], key="repro")


register(Section("repro", "The 1989 reproduction", lambda ctx: bool(ctx.of("repro")), render_repro,
                 "no repro run (backproplab repro)"))


# -- the ladder ----------------------------------------------------------------------------------
def ladder_groups(ctx) -> list[tuple[str, list]]:
    """[(label, [(rung id, Run)] in rung order)]: one group per (store, smoke or full, seeds),
    the newest record of each rung within it."""
    def make():
        from ..experiments.ladder import RUNGS
        by_preset = {p: rid for rid, (p, _) in RUNGS.items()}
        groups = {}
        for r in ctx.of("ladder"):
            base = r.name.removesuffix("-smoke")
            if base not in by_preset:
                continue
            seeds = len(r.per_seed())
            key = (str(r.store), r.name.endswith("-smoke"), seeds)
            groups.setdefault(key, {})[by_preset[base]] = r
        order = list(RUNGS)
        out = []
        for (store, smoke, seeds), rungs in groups.items():
            label = f"{'smoke-size ladder' if smoke else 'ladder'}, {seeds} seed{'s' if seeds > 1 else ''} a rung"
            if len(ctx.stores) > 1:
                label += f" ({store})"
            out.append((label, sorted(rungs.items(), key=lambda kv: order.index(kv[0]))))
        return out
    return ctx.cached("ladder_groups", make)


def ladder_row(ctx, rid, run) -> dict:
    from ..config import from_dict
    from ..experiments.costs import cost_1989_days, training_flops
    from ..experiments.ladder import RUNGS
    per = run.per_seed()
    te, sd = _mean_sd([p.get("test_error") for p in per])
    n = _n_train(ctx, run)
    cfg = from_dict(run.config)
    return {"rung": rid, "change": RUNGS[rid][1], "passes": cfg.train.passes, "seeds": len(per),
            "status": run.status, "test_error": te, "test_error_std": sd or 0.0,
            "test_misses": _mean_sd([p.get("test_misses") for p in per])[0],
            "train_error": _mean_sd([p.get("train_error") for p in per])[0],
            "seconds": run.summary.get("seconds"),
            "train_flops": None if n is None else training_flops(cfg, n),
            "cost_1989_days": None if n is None else cost_1989_days(cfg, n)}


def render_ladder(ctx, page):
    from . import plots
    out = ["<p>Each rung adds one change to the one before (cumulative), all seeds of a rung trained at once. "
           "FLOPs: training one replica (passes × examples × 6 × multiply-adds); 1989 days: the paper's "
           "3 days on a SUN-4/260 for 167,693 presentations, scaled by that work.</p>"]
    head = ["rung", "what changed", "passes", "seeds", "test error %", "test misses", "train error %",
            "training s", "FLOPs", "1989 days"]
    for label, rungs in ladder_groups(ctx):
        rows = [ladder_row(ctx, rid, r) for rid, r in rungs]
        runs = [r for _, r in rungs]
        out.append(f"<h3>{esc(label[0].upper() + label[1:])}</h3>")
        out.append(page.table(
            f"the ladder: {label}", head,
            [[w["rung"], w["change"] + ("" if w["status"] == "finished" else f" ({w['status']})"), str(w["passes"]),
              str(w["seeds"]), pm(w["test_error"], w["test_error_std"] if w["seeds"] > 1 else None),
              fmt(w["test_misses"], ".1f"), fmt(w["train_error"]), fmt(w["seconds"], ".1f"),
              fmt(w["train_flops"], ".2e"), fmt(w["cost_1989_days"], ".1f")] for w in rows],
            runs, [{"data-run": r.id, "data-rung": rid} for rid, r in rungs],
            ["", "", "num", "num", "num", "num", "num", "num", "num", "num"], key="ladder"))
        if all(w["test_error"] is not None for w in rows):
            out.append(page.figure(f"test error per rung with error bars ({label})",
                                   draw(plots.ladder_errors, rows), runs, "test error per ladder rung"))
    return "\n".join(out)


register(Section("ladder", "Time travel: the ladder 1989 → 2022", lambda ctx: bool(ladder_groups(ctx)),
                 render_ladder, "no ladder run (backproplab ladder)"))


# -- learning curves -----------------------------------------------------------------------------
def _curve(run, split="test"):
    """passes (P,), error (R, P) over the passes where the split was evaluated."""
    hs = [h for h in run.history if isinstance(h.get(split), list) and h[split]]
    if not hs:
        return None
    R = min(len(h[split]) for h in hs)
    return np.array([h["pass"] for h in hs]), np.array([[h[split][k]["error"] for h in hs] for k in range(R)])


def render_curves(ctx, page):
    from .figures import replica_curves
    out = ["<p>Error after each evaluated pass, one thin line per replica (seed), the mean in bold.</p>"]
    for label, rungs in ladder_groups(ctx):
        series = {f"rung {rid}": c for rid, r in rungs if (c := _curve(r)) is not None}
        if series:
            out.append(page.figure(f"test error per pass, every rung ({label})",
                                   draw(replica_curves, series, title=f"Ladder: test error per pass ({label})"),
                                   [r for _, r in rungs], "learning curves of the ladder's rungs"))
    for r in repro_runs(ctx):
        series = {f"{sp} error": c for sp in ("train", "test") if (c := _curve(r, sp)) is not None}
        if series:
            out.append(page.figure(f"train and test error per pass, repro run {r.id} ({_setup(r)})",
                                   draw(replica_curves, series, title=f"Repro run {r.id}: {_setup(r)}",
                                        ylabel="error (%)"), [r], "learning curves of a repro run"))
    return "\n".join(out)


def _curve_runs(ctx):
    return [r for _, rungs in ladder_groups(ctx) for _, r in rungs] + repro_runs(ctx)


register(Section("curves", "Learning curves",
                 lambda ctx: any(_curve(r) is not None for r in _curve_runs(ctx)), render_curves,
                 "no ladder or repro run with a per-pass history"))


# -- the misclassified digits --------------------------------------------------------------------
GRID_MAX = 96


def _replay(ctx, run):
    """Seed 0's predictions on the run's test digits from its checkpoint, if the checkpoint's weights
    are the run's (their SHA-256 equals the record's) and they give back the record's test misses:
    -> dict or None."""
    from ..config import from_dict
    from ..engine.checkpoint import load_checkpoint, to_numpy_state
    from ..engine.evaluate import predict
    from ..engine.train import checkpoint_path, make_engine
    from ..errors import UserError
    from ..models.net1989 import weights_sha256
    try:
        cfg = from_dict(run.config)
        ckpt = checkpoint_path(cfg, run.store)
        if not ckpt.is_file():
            return None
        state = load_checkpoint(ckpt, warn=lambda line: None)
        per = run.per_seed()
        seeds = [int(p.get("seed", cfg.train.seed + k)) for k, p in enumerate(per)]
        engine = make_engine(cfg, seeds)
        engine.load_state(to_numpy_state(state["engine"]))
        params = engine.params()[0]
        if weights_sha256(params) != per[0].get("weights_sha256"):
            return None
        d = cfg.data
        data = ctx.dataset(d.source, d.n_train, d.n_test, d.val or 0, d.resolution)
        if data is None:
            return None
        pred = predict(cfg.model, params, data.test_x).argmax(1)
        wrong = np.flatnonzero((pred != data.test_labels).numpy())
        if len(wrong) != int(per[0].get("test_misses", -1)):
            return None
        return {"run": run, "seed": seeds[0], "images": data.test_x[wrong, 0].numpy(),
                "true": data.test_labels[wrong].numpy(), "pred": pred[wrong].numpy(), "n_test": len(pred)}
    except (UserError, OSError, KeyError, ValueError, TypeError, RuntimeError):
        return None


def grids(ctx) -> list[dict]:
    """The last rung of each ladder and the newest repro run, re-evaluated (see _replay)."""
    def make():
        cands = [rungs[-1][1] for _, rungs in ladder_groups(ctx)] + repro_runs(ctx)[-1:]
        return [g for g in (_replay(ctx, r) for r in cands) if g is not None]
    return ctx.cached("grids", make)


def render_grids(ctx, page):
    from . import plots
    out = ["<p>Test digits a trained net still gets wrong (predicted/true above each), from seed 0's weights "
           "in the run's checkpoint, re-evaluated on the run's test split. A grid is drawn only when the "
           "checkpoint's weights hash to the SHA-256 the run recorded and give back its recorded test "
           f"misses; at most {GRID_MAX} digits are shown.</p>"]
    for g in grids(ctx):
        r, k = g["run"], len(g["true"])
        title = f"{r.name}, run {r.id}, seed {g['seed']}: {k} of {g['n_test']} test digits misclassified"
        out.append(page.figure(title, draw(plots.digit_grid, g["images"][:GRID_MAX], g["true"][:GRID_MAX],
                                           g["pred"][:GRID_MAX], title=title + " (predicted/true)"),
                               [r], f"misclassified test digits of run {r.id}"))
    return "\n".join(out)


register(Section("misclassified", "The digits it still gets wrong", lambda ctx: bool(grids(ctx)), render_grids,
                 "no ladder or repro run whose checkpoint holds its recorded weights"))


# -- data scaling --------------------------------------------------------------------------------
def datascale_groups(ctx) -> list[tuple[str, list]]:
    """[(label, [Run] by recipe then training-set size)]: one group per (store, data, smoke, seeds),
    the newest record of each cell (recipe, size)."""
    import re

    def make():
        groups = {}
        for r in ctx.of("datascale"):
            m = re.fullmatch(r"datascale-(.+)-n(\d+)(-smoke)?", r.name)
            if not m:
                continue
            source = (r.config.get("data") or {}).get("source", "?")
            key = (str(r.store), source, bool(m.group(3)), len(r.per_seed()))
            groups.setdefault(key, {})[(m.group(1), int(m.group(2)))] = r
        out = []
        for (store, source, smoke, seeds), cells in groups.items():
            label = f"{source}, {seeds} seed{'s' if seeds > 1 else ''} a cell" + (", smoke size" if smoke else "")
            if len(ctx.stores) > 1:
                label += f" ({store})"
            out.append((label, [(k, cells[k]) for k in sorted(cells)]))
        return out
    return ctx.cached("datascale_groups", make)


def render_datascale(ctx, page):
    from . import plots
    out = ["<p>Test error against the number of training examples, the 1989 and the modern recipe, "
           "each cell trained on the first n training examples and tested on the same test set.</p>"]
    for label, cells in datascale_groups(ctx):
        runs = [r for _, r in cells]
        body, series = [], {}
        for (recipe, n), r in cells:
            per = r.per_seed()
            te, sd = _mean_sd([p.get("test_error") for p in per])
            body.append([recipe, str(n), str((r.config.get("train") or {}).get("passes")), str(len(per)),
                         pm(te, sd), fmt(_mean_sd([p.get("test_misses") for p in per])[0], ".1f"),
                         fmt(_mean_sd([p.get("train_error") for p in per])[0]), fmt(r.summary.get("seconds"), ".1f")])
            x, m, s = series.setdefault(f"{recipe} recipe", ([], [], []))
            x.append(n)
            m.append(te)
            s.append(sd or 0.0)
        out.append(f"<h3>Data {esc(label)}</h3>")
        out.append(page.table(f"data scaling: {label}", ["recipe", "training examples", "passes", "seeds",
                                                        "test error %", "test misses", "train error %", "training s"],
                              body, runs, [{"data-run": r.id} for r in runs],
                              ["", "num", "num", "num", "num", "num", "num", "num"], key="datascale"))
        if all(v is not None for _, m, _ in series.values() for v in m):
            out.append(page.figure(f"test error against training examples ({label})",
                                   draw(plots.loglog_errorbars, series, xlabel="training examples",
                                        ylabel="test error (%)", title=f"data scaling ({label})"),
                                   runs, "test error against training-set size"))
    return "\n".join(out)


register(Section("datascale", "Data scaling", lambda ctx: bool(datascale_groups(ctx)), render_datascale,
                 "no datascale run (backproplab datascale)"))


# -- methods effects -----------------------------------------------------------------------------
def effects_records(ctx):
    return _newest_per(ctx.of("effects"), lambda r: (str(r.store), r.summary.get("base")))


def _effect_runs(ctx, rec):
    base = rec.summary.get("base")
    return [rec] + [r for r in ctx.of("effects-run") if r.store == rec.store
                    and (r.name == base or r.name.startswith(f"{base}+"))]


def render_effects(ctx, page):
    from ..experiments import effects as fx
    out = []
    for rec in effects_records(ctx):
        s = rec.summary
        rows = s.get("rows") or []
        if not rows:
            continue
        b = rows[0]
        runs = _effect_runs(ctx, rec)
        out.append(f"<h3>Base {esc(s.get('base'))}: {esc(s.get('seeds'))} seeds, {esc(s.get('passes'))} passes</h3>")
        split = "validation" if s.get("timing_split") == "val" else "test"
        mult = any("compute_x" in r for r in rows)
        out.append(f"<p>Each method alone on the base recipe. Base: {pm(b['test_error'], b['test_error_std'])}% "
                   f"(n = {b['seeds']}). Difference: method − base in points, Welch's 95% interval and p-value. "
                   f"Time to base: training seconds a seed until the seed-mean {split} error first reaches the "
                   f"base's final {fmt(b['base_error'])}% ({split} split every {esc(s.get('eval_every', 1))} passes; "
                   f"seconds are measured, passes do not depend on the machine's load)."
                   + (" Compute ×: the passes the base needs to reach the method's final test error over the "
                      "method's passes (the base's curve through 1/4, 1/2 and all of its passes; * extrapolated), "
                      "95% bootstrap interval." if mult else "") + "</p>")
        head = ["method", "path", "seeds", "test error %", "diff vs base [95% CI]", "p", "s/seed",
                "to base: s (passes)", "speed-up"] + (["compute × [95% CI]"] if mult else [])
        body = []
        for i, r in enumerate(rows):
            diff = "(base)" if i == 0 else f"{fmt(r['diff'], '+.2f')} [{fmt(r['ci_low'], '+.2f')}, " \
                                           f"{fmt(r['ci_high'], '+.2f')}]"
            to = "never" if r.get("time_to_base") is None else \
                f"{fmt(r['time_to_base'], '.1f')} ({r.get('passes_to_base')})"
            body.append([r["method"], r.get("path") or "–", str(r["seeds"]), pm(r["test_error"], r["test_error_std"]),
                         diff, "" if i == 0 else fmt(r.get("p_value"), ".3f"), fmt(r["seconds_per_seed"], ".1f"),
                         to, fmt(r.get("speedup"))] + ([fx.multiplier_text(r)] if mult else []))
        out.append(page.table(f"effects of each method on {s.get('base')}", head, body, runs,
                              [{"data-method": r["method"], "data-run": rec.id} for r in rows],
                              ["", "", "num", "num", "num", "num", "num", "num", "num", "num"], key="effects"))
        title = f"effects on {s.get('base')}: {s.get('seeds')} seeds, {s.get('passes')} passes"
        out.append(page.figure(f"Pareto plot: test error against training seconds a seed ({s.get('base')})",
                               draw(fx.pareto_plot, rows, title=title), runs, "Pareto plot of the methods"))
        comp = s.get("composition") or []
        if comp:
            out.append(page.table(f"pairs of methods on {s.get('base')}: measured speed-up against the product "
                                  f"of the singles (1.00: they compose multiplicatively)",
                                  ["pair", "speed-up", "singles", "product", "measured / product"],
                                  [[c["pair"], fmt(c.get("speedup")),
                                    f"{fmt(c.get('speedup_a'))} × {fmt(c.get('speedup_b'))}", fmt(c.get("product")),
                                    fmt(c.get("ratio"))] for c in comp], runs,
                                  [{"data-method": c["pair"], "data-run": rec.id} for c in comp],
                                  ["", "num", "num", "num", "num"], key="composition"))
        skipped = sorted((s.get("skipped") or {}).items())
        if skipped:
            out.append("<p class=\"note\">Skipped: " + "; ".join(f"{esc(k)} ({esc(v)})" for k, v in skipped)
                       + "</p>")
    return "\n".join(out)


register(Section("effects", "Methods: their effects on a base recipe",
                 lambda ctx: any(r.summary.get("rows") for r in effects_records(ctx)), render_effects,
                 "no effects run (backproplab effects)"))


# -- compute multipliers (backproplab progress) --------------------------------------------------
def _cell(v) -> str:
    if isinstance(v, bool) or v is None:
        return "–" if v is None else ("yes" if v else "no")
    if isinstance(v, (int, float)):
        return fmt(float(v), ".4g") if isinstance(v, float) else str(v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) or x is None for x in v):
        return f"[{_cell(v[0])}, {_cell(v[1])}]"
    return str(v) if not isinstance(v, (dict, list)) else f"{len(v)} entries"


def _mult(m) -> str:
    """An effective-compute (or -data) multiplier with its 95% interval (None: not measured)."""
    if not isinstance(m, dict):
        return "–"
    if m.get("beyond_floor"):
        return "beyond the floor"
    lo, hi = (list(m.get("ci") or []) + [None, None])[:2]
    return f"{fmt(m.get('multiplier'), '.3g')}× [{fmt(lo, '.3g')}, {fmt(hi, '.3g', 'inf')}]" + \
        (" (extrapolated)" if m.get("extrapolated") else "")


def _progress_tables(rec, page) -> list[str]:
    """`backproplab progress`'s record (experiments/progress.py analyse(): rows, decomposition)."""
    s, out = rec.summary, []
    refs = sorted({k.removeprefix("compute_x_over_") for r in s["rows"] for k in r if k.startswith("compute_x_over_")})
    head = ["recipe", "passes", "seeds", "test error %"] + \
        [f"{w} × over {ref} [95% CI]" for ref in refs for w in ("compute", "data")] + \
        ["alpha [95% CI]", "floor % [95% CI]"]
    body = []
    for r in s["rows"]:
        f = r.get("compute_fit") or {}
        body.append([r["recipe"], str(r.get("passes")), str(r.get("seeds")),
                     pm(r.get("test_error"), r.get("test_error_std") if (r.get("seeds") or 1) > 1 else None)]
                    + [_mult(r.get(f"{w}_x_over_{ref}")) for ref in refs for w in ("compute", "data")]
                    + [_ci(f.get("alpha"), f.get("alpha_ci"), ".2f"), _ci(f.get("floor"), f.get("floor_ci"), ".2f")])
    out.append(page.table(f"effective-compute and -data multipliers ({rec.name}, {s.get('n_boot', '?')} bootstrap "
                          f"refits)", head, body, [rec], [{"data-run": rec.id, "data-recipe": r["recipe"]}
                                                         for r in s["rows"]],
                          ["", "num", "num", "num"] + ["num"] * (2 * len(refs) + 2), key="progress"))
    d = s.get("decomposition")
    if isinstance(d, dict) and d.get("algorithms"):
        a, b = d["algorithms"]
        rows = [[k, _ci(d[k].get("points"), d[k].get("points_ci"), "+.2f"),
                 _ci(100 * d[k]["share"] if d[k].get("share") is not None else None,
                     [None if v is None else 100 * v for v in (d[k].get("share_ci") or [None, None])], ".0f")]
                for k in ("algorithm", "data", "compute") if isinstance(d.get(k), dict)]
        out.append(page.table(f"the drop from {fmt(d.get('from_error'))}% ({a}) to {fmt(d.get('to_error'))}% ({b}) "
                              f"split into algorithm, data and compute (Shapley values)",
                              ["factor", "points [95% CI]", "share % [95% CI]"], rows, [rec],
                              [{"data-run": rec.id, "data-factor": r[0]} for r in rows], ["", "num", "num"],
                              key="decomposition"))
        if d.get("doubling_months") is not None:
            lo, hi = (list(d.get("doubling_months_ci") or []) + [None, None])[:2]
            pub = "; ".join(f"{esc(p['what'])}: {fmt(p['doubling_months'], '.0f')} months"
                            for p in d.get("published") or [])
            out.append(f"<p>{esc(b)} over {esc(a)} in compute: a doubling every "
                       f"{fmt(d['doubling_months'], '.1f')} months [{fmt(lo, '.1f')}, {fmt(hi, '.1f')}]"
                       + (f"; published: {pub}" if pub else "") + ".</p>")
    return out


def render_progress(ctx, page):
    out = ["<p>How much compute (or data) the older recipe would need for the newer recipe's error: "
           "multipliers with 95% bootstrap intervals, as `backproplab progress` recorded them.</p>"]
    for rec in _newest_per(ctx.of("progress"), lambda r: (str(r.store), r.name)):
        rows = [r for r in (rec.summary.get("rows") or []) if isinstance(r, dict)]
        if rows and all("recipe" in r for r in rows):
            out += _progress_tables(rec, page)
            continue
        if rows:                                   # another layout: every scalar column of its rows
            keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, dict)))
            body = [[_cell(r.get(k)) for k in keys] for r in rows]
        else:
            keys = ["quantity", "value"]
            body = [[k, _cell(v)] for k, v in rec.summary.items() if not isinstance(v, (dict, list))
                    or (isinstance(v, list) and len(v) == 2)]
        out.append(page.table(f"compute multipliers: {rec.name} (run {rec.id})", keys, body, [rec],
                              [{"data-run": rec.id}] * len(body), key="progress"))
    return "\n".join(out)


register(Section("multipliers", "Compute multipliers", lambda ctx: bool(ctx.of("progress")), render_progress,
                 "no progress run (backproplab progress)"))


# -- scaling laws --------------------------------------------------------------------------------
def scaling_stores(ctx):
    return [s for s in ctx.stores if any(r.store == s for r in ctx.of("scale"))]


def _ci(v, ci, spec=".4g"):
    lo, hi = (list(ci or []) + [None, None])[:2]
    return f"{fmt(v, spec)} [{fmt(lo, spec)}, {fmt(hi, spec)}]"


def _fit_rows(fam, f) -> list[list[str]]:
    rows = []
    fr = f.get("frontier") or {}
    if fr:
        rows += [[fam, "frontier: log L = intercept + slope log C", "slope", _ci(fr.get("slope"), fr.get("slope_ci"))],
                 [fam, "", "intercept", _ci(fr.get("intercept"), fr.get("intercept_ci"))],
                 [fam, "", f"loss at C = {fmt(fr.get('C_ref'), '.3g')}",
                  _ci(fr.get("loss_at_C_ref"), fr.get("loss_at_C_ref_ci"))]]
    ch = f.get("chinchilla") or {}
    if "constants" in ch:
        c, ci = ch["constants"], ch.get("intervals") or {}
        rows += [[fam, "Chinchilla: L = E + A/N^alpha + B/D^beta" if k == "E" else "", k, _ci(c.get(k), ci.get(k))]
                 for k in ("E", "A", "B", "alpha", "beta")]
        co = ch.get("compute_optimal") or {}
        rows += [[fam, "compute-optimal allocation", "N* ~ C^x: x", _ci(co.get("N_opt_exponent"),
                                                                       ci.get("N_opt_exponent"), ".3f")],
                 [fam, "", "D* ~ C^x: x", _ci(co.get("D_opt_exponent"), ci.get("D_opt_exponent"), ".3f")]]
    elif ch.get("why_no_fit"):
        rows.append([fam, "Chinchilla", "not fitted", ch["why_no_fit"]])
    for name, p in (f.get("isoflop") or {}).items():
        rows.append([fam, "IsoFLOP profile", f"{name}_opt ~ C^x: x",
                     _ci(p.get("exponent"), p.get("exponent_ci"), ".3f") if p.get("exponent") is not None
                     else f"not fitted: {p.get('why_no_fit')}"])
    return rows


def render_scaling(ctx, page):
    from ..errors import UserError
    from ..scaling import plots as sp
    from ..scaling.runs import load_runs_from_store
    from ..store import DB_NAME
    out = ["<p>A scaling study: model sizes × training-set sizes × epoch budgets, a learning-rate sweep in "
           "every cell chosen on validation loss (validation carved from the training set), the test set only "
           "reported. Fits with 95% bootstrap intervals, as `backproplab scale fit` recorded them.</p>"]
    for store in scaling_stores(ctx):
        cells = [r for r in ctx.of("scale") if r.store == store]
        fits = [r for r in ctx.of("scale_fit") if r.store == store]
        if len(ctx.stores) > 1:
            out.append(f"<h3>Study in <code>{esc(store)}</code></h3>")
        fit = fits[-1] if fits else None
        frontiers = {}
        if fit:
            fams = fit.summary.get("families") or {}
            rows = [row for fam, f in fams.items() for row in _fit_rows(fam, f)]
            frontiers = {fam: f["frontier"] for fam, f in fams.items() if f.get("frontier")}
            out.append(page.table(f"scaling fits of {fit.summary.get('n_runs')} runs (95% bootstrap intervals)",
                                  ["family", "fit", "quantity", "value [95% CI]"], rows, [fit],
                                  [{"data-run": fit.id}] * len(rows), ["", "", "", "num"], key="scale_fit"))
        else:
            out.append("<p class=\"note\">No fit recorded for this study: `backproplab scale fit "
                       f"{esc(store / DB_NAME)}` adds one.</p>")
        try:
            runs = load_runs_from_store(store / DB_NAME, min_runs=1)
            out.append(page.figure("validation loss against training compute, every run of the sweeps; the "
                                   "frontier fit where recorded", draw(sp.loss_vs_compute, runs, frontiers),
                                   cells + ([fit] if fit else []), "loss against compute"))
        except UserError as e:
            out.append(f"<p class=\"note\">No loss-compute plot: {esc(e)}</p>")
        order = sorted(cells, key=lambda r: (str(r.summary.get("family")), r.summary.get("N") or 0,
                                             r.summary.get("n_train") or 0, r.summary.get("epochs") or 0))
        head = ["family", "N (parameters)", "training set", "epochs", "C (FLOPs)", "best lr", "val loss",
                "test error %", "status"]
        body = [[str(s.get("family")), str(s.get("N")), str(s.get("n_train")), fmt(s.get("epochs"), "g"),
                 fmt(s.get("C"), ".3g"), fmt(s.get("lr"), ".4g") + (" (edge)" if s.get("best_at_edge") else ""),
                 pm(s.get("val_loss"), s.get("val_loss_sd"), ".4f"), fmt(s.get("test_error")), r.status]
                for r in order for s in [r.summary]]
        out.append(page.table(f"the study's {len(cells)} cells (best rate by validation loss, mean ± sd over "
                              f"the seeds)", head, body, order, [{"data-run": r.id} for r in order],
                              ["", "num", "num", "num", "num", "num", "num", "num", ""], key="scale_cells"))
    return "\n".join(out)


register(Section("scaling", "Scaling laws", lambda ctx: bool(scaling_stores(ctx)), render_scaling,
                 "no scaling study (backproplab scale run)"))
