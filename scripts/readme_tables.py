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


def render(rec: dict) -> str:
    s = rec["summary"]
    rows, base = s["rows"], s["rows"][0]
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
    if skipped:
        out += [""] + [f"- skipped {k}: {why}" for k, why in skipped]
    if mult:
        out += ["", "compute x: the passes the base needs to reach the method's final test error, over the method's "
                    "passes (the base's curve: a power law with a floor through 1/4, 1/2 and 1 of its passes; "
                    "95% bootstrap interval over seeds; * beyond the base's own passes)."]
    return "\n".join(out)


def replace_block(text: str, base: str, body: str) -> str:
    begin, end = f"<!-- effects:{base}:begin -->", f"<!-- effects:{base}:end -->"
    if begin not in text or end not in text:
        raise UserError(f"the README has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="output folder (or runs.db) of the effects run")
    ap.add_argument("--base", default="modern")
    ap.add_argument("--readme", default=str(Path(__file__).resolve().parents[1] / "docs" / "results.md"),
                    help="the page holding the effects blocks (default docs/results.md)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the README is not what the store gives")
    a = ap.parse_args(argv)
    try:
        readme = Path(a.readme)
        text = readme.read_text()
        new = replace_block(text, a.base, render(newest_effects(a.store, a.base)))
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.check:
        return 0 if new == text else 1
    readme.write_text(new)
    print(f"wrote the {a.base} effects block of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
