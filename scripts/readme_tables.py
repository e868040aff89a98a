"""Write the effects tables of docs/results.md (the README's results page) from the results
store, so the figures are the store's.

    python scripts/readme_tables.py --store DIR [--base modern] [--readme docs/results.md] [--check]

Reads the newest `effects` record of the base (what `backproplab effects --base B --out DIR`
stored) and replaces the README block between `<!-- effects:B:begin -->` and
`<!-- effects:B:end -->` with: the run's size, one row per method (mean +- std over seeds,
difference against the base with its 95% CI and Welch p, training seconds a seed, time and
passes to the base's error, speed-up, the engine path), the pairs' measured speed-up against
the product of their singles, and the skipped methods with the reason. --check exits 1 when
the README differs from what the store gives (nothing written).
"""
import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from backproplab.errors import UserError  # noqa: E402
from backproplab.experiments.effects import multiplier_text  # noqa: E402
from backproplab.store import list_runs  # noqa: E402


def _f(v, fmt, none="-"):
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def newest_effects(store, base: str) -> dict:
    runs = [r for r in list_runs(store) if r["kind"] == "effects" and r["summary"].get("base") == base
            and not r["summary"].get("smoke")]
    if not runs:
        raise UserError(f"no effects record of base {base!r} in {store}")
    return runs[-1]


def registry_order(rows: list) -> list:
    """The base, the single methods in the registry's order, then the pairs as stored (a store
    written while runs finished in another order reads the same)."""
    from backproplab.methods.registry import list_methods
    rank = {m.name: i for i, m in enumerate(list_methods())}
    singles = [r for r in rows[1:] if "+" not in r["method"]]
    return [rows[0], *sorted(singles, key=lambda r: rank.get(r["method"], len(rank))),
            *[r for r in rows[1:] if "+" in r["method"]]]


def render(rec: dict) -> str:
    s = rec["summary"]
    rows = registry_order(s["rows"])
    base = rows[0]
    mult = bool(s.get("multipliers"))
    every = s.get("eval_every", 1)
    every_s = f"every {every} pass{'es' if every > 1 else ''}"
    if s.get("timing_split") == "val":
        how = (f"validation split of {s['val']} training digits {every_s}, test split once at the end", "validation")
    else:  # a record from before effects held out a validation split
        how = (f"test split {every_s}; a record from before effects held out a validation split, so its "
               f"times and its choice of pairs come from the test curve", "test")
    out = [f"`backproplab effects --base {s['base']} --seeds {s['seeds']}` ({s['passes']} passes, {how[0]}; "
           f"run {rec['id']} of the store, status {rec['status']}). "
           f"Base: {base['test_error']:.2f} +- {base['test_error_std']:.2f}% test error (n = {base['seeds']}). "
           f"Differences are method - base in points with Welch's 95% interval; time to base = training seconds "
           f"a seed until the seed-mean {how[1]} error first reaches the base's final {base['base_error']:.2f}% "
           f"(seconds measured on a shared 2-core machine: passes to base do not depend on the load).", "",
           "| method | path | test error % | diff vs base [95% CI] | p | s/seed | to base: s (passes) | speed-up |"
           + (" compute x [95% CI] |" if mult else ""),
           "|---|---|---|---|---|---|---|---|" + ("---|" if mult else "")]
    for i, r in enumerate(rows):
        diff = "(base)" if i == 0 else f"{r['diff']:+.2f} [{_f(r['ci_low'], '+.2f')}, {_f(r['ci_high'], '+.2f')}]"
        to = "never" if r["time_to_base"] is None else f"{r['time_to_base']:.1f} ({r['passes_to_base']})"
        out.append(f"| {r['method']} | {r.get('path') or '-'} | {r['test_error']:.2f} +- {r['test_error_std']:.2f} "
                   f"| {diff} | {'' if i == 0 else _f(r['p_value'], '.3f')} | {r['seconds_per_seed']:.1f} | {to} "
                   f"| {_f(r['speedup'], '.2f')} |" + (f" {multiplier_text(r)} |" if mult else ""))
    comp = s.get("composition") or []
    if comp:
        out += ["", "| pair | speed-up | singles | product | measured / product |", "|---|---|---|---|---|"]
        for c in comp:
            out.append(f"| {c['pair']} | {_f(c['speedup'], '.2f')} | {_f(c['speedup_a'], '.2f')} x "
                       f"{_f(c['speedup_b'], '.2f')} | {_f(c['product'], '.2f')} | {_f(c['ratio'], '.2f')} |")
    skipped = sorted((s.get("skipped") or {}).items())
    again = [r["method"] for r in rows[1:] if r.get("same_as_base")]
    if skipped or again:
        out.append("")
    if again:
        out.append(f"- the base again (every validation error the base's, every pass and seed: already in "
                   f"the recipe, or no change to this net; not paired): {', '.join(again)}")
    out += [f"- skipped {k}: {why}" for k, why in skipped]
    if mult:
        out += ["", "compute x: the passes the base needs to reach the method's final test error, over the method's "
                    "passes (the base's curve: a power law with a floor through 1/4, 1/2 and 1 of its passes; "
                    "95% bootstrap interval over seeds; * beyond the base's own passes)."]
    return "\n".join(out)


def newest_progress(store) -> dict:
    every = [r for r in list_runs(store) if r["kind"] == "progress"]
    runs = [r for r in every if not r["summary"].get("smoke")] or every  # smoke-size only when nothing else
    if not runs:
        raise UserError(f"no progress record in {store}")
    return runs[-1]


def _mult(m, who):
    if m is None:
        return "-"
    if m["beyond_floor"]:
        return f"beyond {who}'s floor"
    lo, hi = m["ci"]
    hi_s = "inf" if hi is None or not math.isfinite(hi) else f"{hi:.3g}"
    return f"{m['multiplier']:.3g}x [{_f(lo, '.3g')}, {hi_s}]" + (" *" if m["extrapolated"] else "")


def _ci(v, key, fmt=".2f"):
    return f"{v[key]:{fmt}} [{v[key + '_ci'][0]:{fmt}}, {v[key + '_ci'][1]:{fmt}}]"


def render_progress(rec: dict) -> str:
    """The progress page's tables from a `backproplab progress` record."""
    s = rec["summary"]
    out = [f"`backproplab progress` (run {rec['id']} of its store): {s['seeds']} seeds a point; budgets "
           f"{', '.join(s['budgets'])} of each recipe's passes on all the training digits; sizes "
           f"{', '.join(s['sizes'])} of the digits at the full passes; {s['n_boot']} bootstrap refits; test error. "
           f"* = extrapolated beyond the reference's measured range.", "",
           "| recipe | passes | test error | compute x over rung 1 | data x over rung 1 | compute x over rung 5 "
           "| slope alpha [95% CI] | floor % [95% CI] |", "|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        out.append(f"| {r['recipe']} | {r['passes']} | {r['test_error']:.2f}% +- {r['test_error_std']:.2f} "
                   f"| {_mult(r.get('compute_x_over_rung1'), 'rung 1')} | {_mult(r.get('data_x_over_rung1'), 'rung 1')} "
                   f"| {_mult(r.get('compute_x_over_rung5'), 'rung 5')} | {_ci(r['compute_fit'], 'alpha')} "
                   f"| {_ci(r['compute_fit'], 'floor')} |")
    out += ["", "Shift or slope (alpha of each compute curve minus rung 1's, 95% CI):", "",
            "| recipe | alpha - alpha(rung 1) | verdict |", "|---|---|---|"]
    for c in s["comparisons"]:
        if c["over"] == "rung1":
            k = c["compute"]
            out.append(f"| {c['recipe']} | {k['alpha_diff']:+.2f} [{k['alpha_diff_ci'][0]:+.2f}, "
                       f"{k['alpha_diff_ci'][1]:+.2f}] | {k['verdict']} |")
    for c in s["comparisons"]:
        if c["over"] == "rung1" and c["recipe"] == "rung5":
            out += ["", "Rung 5 over rung 1 at each of rung 5's budgets and sizes:", "",
                    "| rung 5 budget (FLOPs) | rung 5's test error | compute x over rung 1 [95% CI] |", "|---|---|---|"]
            out += [f"| {a['x']:.3g} | {a['error']:.2f}% | {_mult(a, 'rung 1')} |" for a in c["compute"]["at"]]
            out += ["", "| training digits | rung 5's test error | data x over rung 1 [95% CI] |", "|---|---|---|"]
            out += [f"| {int(a['x'])} | {a['error']:.2f}% | {_mult(a, 'rung 1')} |" for a in c["data"]["at"]]
    d = s.get("decomposition")
    if d:
        cells = {k: v["key"] for k, v in d["cells"].items()}
        lo, hi = cells["0,0,0"], cells["1,1,1"]
        out += ["", f"The decomposition of the drop {d['from_error']:.2f}% -> {d['to_error']:.2f}% ({lo[0]} on {lo[1]:,} "
                    f"digits at {lo[2]} passes -> {hi[0]} on {hi[1]:,} digits at {hi[2]} passes), Shapley values over "
                    f"the 2 x 2 x 2 grid ({s['seeds']} seeds a cell):", "",
                "| factor | points [95% CI] | share [95% CI] |", "|---|---|---|"]
        for f in ("algorithm", "data", "compute"):
            v = d[f]
            out.append(f"| {f} | {_ci(v, 'points')} | {100 * v['share']:.0f}% [{100 * v['share_ci'][0]:.0f}, "
                       f"{100 * v['share_ci'][1]:.0f}] |")
        out += ["", "| cell (recipe, digits, passes) | test error |", "|---|---|"]
        out += [f"| {v['key'][0]}, {v['key'][1]}, {v['key'][2]} | {v['test_error']:.2f}% |"
                for _, v in sorted(d["cells"].items())]
    return "\n".join(out)


def replace_block(text: str, base: str, body: str, kind: str = "effects") -> str:
    key = f"{kind}:{base}" if base else kind
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    if begin not in text or end not in text:
        raise UserError(f"the README has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="output folder (or runs.db) of the effects (or progress) run")
    ap.add_argument("--base", default="modern")
    ap.add_argument("--progress", action="store_true",
                    help="write the progress block (default page docs/progress.md) instead of an effects block")
    ap.add_argument("--readme", help="the page holding the block (default docs/results.md; docs/progress.md "
                                     "with --progress)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the README is not what the store gives")
    a = ap.parse_args(argv)
    docs = Path(__file__).resolve().parents[1] / "docs"
    try:
        readme = Path(a.readme or docs / ("progress.md" if a.progress else "results.md"))
        text = readme.read_text()
        if a.progress:
            new = replace_block(text, "", render_progress(newest_progress(a.store)), kind="progress")
        else:
            new = replace_block(text, a.base, render(newest_effects(a.store, a.base)))
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.check:
        return 0 if new == text else 1
    readme.write_text(new)
    print(f"wrote the {'progress' if a.progress else a.base + ' effects'} block of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
