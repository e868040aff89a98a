"""Measured effects: each method alone on top of a base recipe, then pairs of methods.

Every run is the base config plus methods (methods.registry.with_method: a method replaces
the base's method or config field doing the same job), trained on n seeds by train().
By default the last VAL training digits are held out (data.val) and the curve that times
a run is the validation curve: the validation split is evaluated every `eval_every` passes
(default: CURVE_POINTS points on the curve, every 4th pass of the modern base's 80), the
test and training splits after the last pass only (train.eval_test=false,
train.eval_train=false), so nothing the table chooses (which pairs are run) or times has
looked at the test split; the test error is reported once, at the end. With val=0 (the
whole training set) the test curve times the runs instead, and pairs must be named.
Per run and against the base:
  test error        mean and sample std over seeds after the last pass
  difference        method - base, 95% confidence interval (Welch-Satterthwaite t) and
                    Welch's t-test p-value (scipy.stats.ttest_ind, equal_var=False)
  time to base      training seconds a seed until the seed-mean error on the timing curve
                    (validation; test with val=0) first reaches the base's final mean on
                    that split (None: never), at the first evaluated pass that does (so to
                    within eval_every passes); also in passes, which do not depend on the
                    machine's load
  speed-up          base's time to its own final error / the method's time
Composition: for pairs of compatible methods, the measured speed-up against the product
of the two single speed-ups (1.0 = they compose multiplicatively).
Multipliers (multipliers=True): the base and every single method also run at 1/4 and 1/2 of
the base's passes (each its own run, schedules scaled to its length); each method's
effective-compute multiplier over the base is the passes the base's curve (a power law with
a floor through its three budgets, experiments/progress.py) needs to reach the method's final
test error, over the method's passes, with a 95% bootstrap interval over seeds. It is in
units of training passes: a method whose pass costs more (SAM: two gradients a step) gets
no discount for it here.
"""
import math
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..config import preset, validate
from ..errors import UserError

SMOKE_METHODS = ("label_smoothing", "ema")
CURVE_POINTS = 20   # default evaluations a run: every max(1, passes // CURVE_POINTS) passes
VAL = 1000          # default validation digits held out of the training set (the presets were tuned so)
SMOKE_VAL = 100


def default_eval_every(passes: int) -> int:
    return max(1, passes // CURVE_POINTS)


def base_config(base: str, seeds: int, smoke: bool, passes=None, eval_every=None, val=None):
    from ..config import smoke_preset
    cfg = smoke_preset(base) if smoke else preset(base)
    if passes is not None:
        cfg.train.passes = passes
    cfg.train.engine = "population"  # methods run on the population engine; the base runs there too
    cfg.train.seeds, cfg.train.eval_train = seeds, False
    cfg.train.eval_every = default_eval_every(cfg.train.passes) if eval_every is None else int(eval_every)
    cfg.data.val = (SMOKE_VAL if smoke else VAL) if val is None else int(val)
    if cfg.data.n_train is not None and cfg.data.val >= cfg.data.n_train:
        raise UserError(f"--val {cfg.data.val}: must be smaller than the {cfg.data.n_train} training digits")
    cfg.train.eval_test = not cfg.data.val  # with a validation split the test split waits for the end
    return validate(cfg)


def with_methods(base_cfg, names):
    from ..methods.registry import with_method
    cfg = base_cfg
    for n in names:
        cfg = with_method(cfg, n)
    cfg.name = base_cfg.name + "+" + "+".join(names)
    return validate(cfg)


def single_configs(base_cfg, methods):
    """-> ({method: Config}, {method: why skipped}); a method that cannot run on the base is skipped."""
    from ..methods.registry import get_method
    cfgs, skipped = {}, {}
    for m in methods:
        get_method(m)  # unknown names are the user's error, not a skip
        try:
            cfgs[m] = with_methods(base_cfg, [m])
        except UserError as e:
            skipped[m] = str(e)
    return cfgs, skipped


def pair_configs(base_cfg, pairs):
    from ..methods.registry import incompatibility
    cfgs, skipped = {}, {}
    for a, b in pairs:
        why = incompatibility(a, b)
        key = f"{a}+{b}"
        if why:
            skipped[key] = why
            continue
        try:
            cfgs[key] = with_methods(base_cfg, [a, b])
        except UserError as e:
            skipped[key] = str(e)
    return cfgs, skipped


def timing_split(res) -> str:
    """The split whose curve times a run: validation when the run held one out, else test."""
    return "val" if res.history and "val" in res.history[0] else "test"


def curve(res, split=None):
    """-> passes (P,), seed-mean error on split (default timing_split) (P,), cumulative training
    seconds a seed (P,); records without that split (the test split before the last pass) are left out."""
    split = split or timing_split(res)
    R = len(res.final)
    hist = [h for h in res.history if split in h]
    passes = np.array([h["pass"] for h in hist])
    err = np.array([np.mean([t["error"] for t in h[split]]) for h in hist])
    if all("seconds_total" in h for h in hist):
        secs = np.array([h["seconds_total"] for h in hist]) / R
    else:  # records from before seconds_total, evaluated after every pass
        secs = np.cumsum([h["seconds"] for h in res.history]) / R
    return passes, err, secs


def time_to(res, target: float, split=None):
    """(seconds a seed, passes) until the seed-mean error on split is <= target, or (None, None)."""
    passes, err, secs = curve(res, split)
    hit = np.nonzero(err <= target + 1e-9)[0]
    if len(hit) == 0:
        return None, None
    return float(secs[hit[0]]), int(passes[hit[0]])


def welch(a, b):
    """a, b: samples -> (mean(a) - mean(b), 95% CI low, high, p-value); nan when undefined."""
    from scipy import stats
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return d, float("nan"), float("nan"), float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return d, d, d, (1.0 if d == 0 else 0.0)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    h = float(stats.t.ppf(0.975, df)) * se
    with warnings.catch_warnings():  # nearly constant samples: scipy warns, the p-value is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return d, d - h, d + h, p


def error_trace(res, split: str) -> tuple:
    """Every error a run recorded on `split` (the timing split: validation, which may choose), per
    pass and seed: two runs with equal traces learned the same thing (a method already in the base's
    recipe, or one that changes nothing on its net). The test split takes no part: the mark decides
    what is paired."""
    return tuple(tuple(t["error"] for t in h[split]) for h in res.history if split in h)


def analyse(results: dict, base_key: str) -> list[dict]:
    """results: key -> Result (the base under base_key). -> one row per key, the base first;
    same_as_base: every error on the timing split equals the base's (error_trace)."""
    base = results[base_key]
    b_err = [f["test_error"] for f in base.final]
    split = timing_split(base)
    target = float(np.mean([f[f"{split}_error"] for f in base.final]))
    b_time, b_passes = time_to(base, target, split)
    b_trace = error_trace(base, split)
    rows = []
    for key in [base_key] + [k for k in results if k != base_key]:
        res = results[key]
        err = [f["test_error"] for f in res.final]
        d, lo, hi, p = welch(err, b_err)
        t, ps = time_to(res, target, split) if timing_split(res) == split else (None, None)
        total = res.seconds / max(len(res.final), 1)
        rows.append({"method": key, "status": res.status, "path": res.path, "seeds": len(err),
                     "test_error": float(np.mean(err)),
                     "test_error_std": float(np.std(err, ddof=1)) if len(err) > 1 else 0.0,
                     "diff": d, "ci_low": lo, "ci_high": hi, "p_value": p, "seconds_per_seed": total,
                     "time_to_base": t, "passes_to_base": ps, "base_error": target, "timing_split": split,
                     **({"val_error": float(np.mean([f["val_error"] for f in res.final]))}
                        if timing_split(res) == "val" else {}),
                     "speedup": (b_time / t) if (t and b_time) else None,
                     "speedup_passes": (b_passes / ps) if (ps and b_passes) else None,
                     "same_as_base": key != base_key and error_trace(res, split) == b_trace})
    return rows


def compose(rows: list[dict]) -> list[dict]:
    """Pairs 'a+b' whose singles 'a' and 'b' are rows too: measured speed-up vs the product."""
    by = {r["method"]: r for r in rows}
    out = []
    for r in rows:
        parts = r["method"].split("+")
        if len(parts) != 2 or parts[0] not in by or parts[1] not in by:
            continue
        sa, sb = by[parts[0]]["speedup"], by[parts[1]]["speedup"]
        prod = sa * sb if sa and sb else None
        out.append({"pair": r["method"], "speedup": r["speedup"], "speedup_a": sa, "speedup_b": sb,
                    "product": prod, "ratio": (r["speedup"] / prod) if (r["speedup"] and prod) else None,
                    "test_error": r["test_error"], "diff": r["diff"], "p_value": r["p_value"]})
    return out


def top_pairs(rows: list[dict], k: int, compatible=None) -> list[tuple]:
    """All pairs among k single methods that reached the base's validation error, fastest first.
    Reaching it is the criterion, not a speed-up above 1: on a shared machine the seconds of two runs
    with the same work can differ by a third. A method whose run is the base's again (same_as_base,
    on the validation curve: already in the recipe, or no change to its net) is left out: its pairs would be the other
    method alone. compatible(a, b) -> bool (default: every pair): a method that cannot run beside
    one already chosen (two optimizers, two normalizations) is passed over for the next fastest.
    Only a validation curve may choose: rows timed on the test curve (val=0) are refused."""
    if k and rows and rows[0].get("timing_split", "test") != "val":
        raise UserError("choosing pairs needs a validation split (--val N > 0): name them with --pairs a+b")
    fast = sorted([r for r in rows[1:] if r["speedup"] and "+" not in r["method"] and not r.get("same_as_base")],
                  key=lambda r: -r["speedup"])
    names = []
    for r in fast:
        if len(names) == k:
            break
        if compatible is None or all(compatible(a, r["method"]) for a in names):
            names.append(r["method"])
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def _f(v, fmt, none="-"):
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_table(rows: list[dict]) -> str:
    from ..report.console import render, table
    mult = any("compute_x" in r for r in rows)
    cols = ["method"] + [(c, "right") for c in ("test error %", "diff vs base [95% CI]", "p", "s/seed", "to base: s",
                                                "passes", "speed-up") + (("compute x [95% CI]",) if mult else ())]
    body = []
    for i, r in enumerate(rows):
        diff = "(base)" if i == 0 else f"{r['diff']:+.2f} [{_f(r['ci_low'], '+.2f')}, {_f(r['ci_high'], '+.2f')}]"
        body.append([r["method"], f"{r['test_error']:.2f} +- {r['test_error_std']:.2f}", diff,
                     "" if i == 0 else _f(r["p_value"], ".3f"), f"{r['seconds_per_seed']:.1f}",
                     _f(r["time_to_base"], ".1f", "never"), _f(r["passes_to_base"], "d"), _f(r["speedup"], ".2f")]
                    + ([multiplier_text(r)] if mult else []))
    return render(table(cols, body))


def multiplier_text(r) -> str:
    """'1.8x [1.2, 2.9]', 'beyond floor', '-' (pairs, or no multipliers run)."""
    if r.get("compute_x_beyond_floor"):
        return "beyond floor"
    m = r.get("compute_x")
    if m is None:
        return "-"
    lo, hi = r["compute_x_ci"]
    return (f"{m:.2f}x [{_f(lo, '.2f')}, {'inf' if hi is None or hi == math.inf else _f(hi, '.2f')}]"  # stored: None
            + ("*" if r.get("compute_x_extrapolated") else ""))


def format_composition(comp: list[dict]) -> str:
    if not comp:
        return "composition: no pair of methods with both singles measured"
    from ..report.console import render, table
    cols = ["pair"] + [(c, "right") for c in ("speed-up", "a x b", "product", "measured/product")]
    return render(table(cols, [[c["pair"], _f(c["speedup"], ".2f"), _f(c["speedup_a"], ".2f") + " x " +
                                _f(c["speedup_b"], ".2f"), _f(c["product"], ".2f"), _f(c["ratio"], ".2f")]
                               for c in comp]))


PLOT_TOP = 2.5   # the error axis ends at this many times the base's error; worse runs sit on the edge


def pareto_plot(rows, path, title):
    """Test error against training seconds a seed (log axis), error bars over seeds, the Pareto
    front; runs beyond PLOT_TOP x the base's error are drawn as triangles on the top edge with
    their error in the label, so one diverged method does not flatten the rest."""
    from ..report.plots import _plt
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 6))
    top = PLOT_TOP * rows[0]["test_error"]
    pts = sorted((r["seconds_per_seed"], r["test_error"], r["method"]) for r in rows)
    front, best = [], float("inf")
    for s_, e, m in pts:
        if e < best:
            front.append((s_, min(e, top)))
            best = e
    for i, r in enumerate(rows):  # the base (black square), single methods (blue), pairs (purple)
        color = "black" if i == 0 else ("tab:purple" if "+" in r["method"] else "tab:blue")
        x, e = r["seconds_per_seed"], r["test_error"]
        if e > top:
            ax.plot(x, top, "^", color="tab:red", alpha=0.8)
            ax.annotate(f"{r['method']} ({e:.1f}%)", (x, top), fontsize=7, xytext=(3, -10),
                        textcoords="offset points", color="tab:red")
            continue
        ax.errorbar(x, e, yerr=r["test_error_std"], fmt="s" if i == 0 else "o", color=color, capsize=3, alpha=0.8)
        ax.annotate(r["method"], (x, e), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot(*zip(*front), "--", color="tab:red", alpha=0.6, drawstyle="steps-post", label="Pareto front")
    ax.axhline(rows[0]["test_error"], color="grey", lw=0.8, alpha=0.6, label="base error")
    ax.set_xscale("log")
    ax.set_ylim(0, top * 1.02)
    ax.set_xlabel("training seconds a seed (log scale; measured, the machine may be shared)")
    ax.set_ylabel(f"test error % (mean +- std over seeds; above {top:.1f}% on the edge)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


BASE_KEY = "base"
MULTIPLIER_BUDGETS = (Fraction(1, 4), Fraction(1, 2))   # and the full budget: three points a curve


def budget_configs(cfgs: dict, fractions=MULTIPLIER_BUDGETS) -> dict:
    """(key, fraction) -> the config at that fraction of its passes: its own run, its own schedule."""
    from ..config import from_dict
    out = {}
    for key, cfg in cfgs.items():
        for f in fractions:
            c = from_dict(cfg.to_dict())
            c.train.passes = max(1, round(cfg.train.passes * f))
            c.train.eval_every = min(cfg.train.eval_every, c.train.passes)
            c.name = f"{cfg.name}@{f.numerator}-{f.denominator}"  # a file name: no slash
            out[(key, str(f))] = validate(c)
    passes = sorted({c.train.passes for c in out.values() if c.name.startswith(cfgs[BASE_KEY].name + "@")} |
                    {cfgs[BASE_KEY].train.passes})
    if len(passes) < 3:
        raise UserError(f"multipliers need three distinct budgets; {cfgs[BASE_KEY].train.passes} passes give "
                        f"{', '.join(map(str, passes))} (use --passes 4 or more)")
    return out


def add_multipliers(rows, results, cfgs, budget_results, budget_cfgs, n_boot=300, seed=0):
    """Fill each single method's row with its effective-compute multiplier over the base."""
    from .progress import Curve, compare
    rng = np.random.default_rng(seed)

    def curve(key):
        pts = [(budget_cfgs[(key, str(f))].train.passes, budget_results[(key, str(f))]) for f in MULTIPLIER_BUDGETS]
        pts.append((cfgs[key].train.passes, results[key]))
        return Curve([p for p, _ in pts], [[f["test_error"] for f in r.final] for _, r in pts], n_boot, rng)
    base = curve(BASE_KEY)
    for r in rows:
        key = r["method"]
        if "+" in key or (key, str(MULTIPLIER_BUDGETS[0])) not in budget_results:
            continue
        try:
            c = compare(base, curve(key))
        except ValueError as e:  # a diverged budget (NaN or zero error): no curve to read
            r["compute_x"] = None
            r["compute_x_note"] = str(e)
            continue
        m = c["at"][-1]
        r.update({"compute_x": m["multiplier"], "compute_x_ci": m["ci"], "compute_x_beyond_floor": m["beyond_floor"],
                  "compute_x_extrapolated": m["extrapolated"], "compute_x_slope": c["verdict"],
                  "compute_x_at": [{"passes": int(a["x"]), "multiplier": a["multiplier"], "ci": a["ci"]}
                                   for a in c["at"]]})
    return rows


RUN_KIND = "effects-run"


def record_run(store, key, res, env) -> int:
    """One run of the effects grid into the store (kind effects-run, its key as summary['method'])
    unless a run of that config digest and status is there already (a resumed or retried run)
    -> its id."""
    from ..store import add_run, recorded_run
    s = res.summary()
    s["method"] = key if isinstance(key, str) else f"{key[0]}@{key[1]}"  # "name@1/4": a multipliers budget run
    run_id = recorded_run(store, RUN_KIND, s["config_digest"], res.status)
    if run_id is None:
        run_id = add_run(store, RUN_KIND, res.config["name"], res.status, res.config, s, res.history, env)
    return run_id


def stored_result(rec):
    """A Result rebuilt from its effects-run record (config, history and per-seed finals as
    train() returned them), for analyse() on runs other processes or machines trained."""
    from ..engine.train import Result
    s, cfg = rec["summary"], rec["config"]
    seeds = [cfg["train"]["seed"] + k for k in range(cfg["train"]["seeds"])]
    if "per_seed" in s:
        final = [dict(f) for f in s["per_seed"]]
    else:  # one seed: summary() copied its final's figures to the top level
        keys = [f"{sp}_{k}" for sp in ("train", "val", "test") for k in ("loss", "error", "misses")]
        final = [{"seed": seeds[0], **{k: s[k] for k in keys if k in s}, "weights_sha256": s["weights_sha256"]}]
    return Result(cfg, seeds, rec["history"], final, float(s["seconds"]), float(s["eval_seconds"]),
                  status=rec["status"], message=s.get("message", ""), path=s.get("path", ""))


def run_point(key, cfg_dict: dict, out, store) -> tuple[int, float]:
    """ONE point of the effects grid, as a worker runs it: train (resuming a checkpoint in out,
    a killed attempt's), record it once -> (run id, seed-mean error on its timing split)."""
    from ..config import from_dict
    from ..engine.checkpoint import has_checkpoint
    from ..engine.train import checkpoint_path, environment, train
    cfg = from_dict(cfg_dict)
    res = train(cfg, out=out, resume=has_checkpoint(checkpoint_path(cfg, Path(out))))
    run_id = record_run(store, key, res, environment())
    split = timing_split(res)
    err = float(np.mean([f[f"{split}_error"] for f in res.final]))
    return run_id, err if math.isfinite(err) else 100.0


def run_effects(base: str, methods, seeds: int, out, resume=False, jobs=1, smoke=False, passes=None,
                pairs=None, top_k=3, log=print, eval_every=None, val=None, multipliers=False, n_boot=300,
                runner=None):
    """methods: names (None: every registered method that runs on the base; smoke: SMOKE_METHODS).
    pairs: [(a, b)] or None for all pairs among the top_k single speed-ups.
    runner(cfgs, label) -> {key: Result}: how a batch of configs is trained (default: run_configs
    here, `jobs` at a time; search/grid.py hands them to Optuna workers).
    -> (rows, composition, skipped {key: why}, results {key: Result}, configs {key: Config})."""
    from ..methods.registry import list_methods
    from .pool import run_configs
    base_cfg = base_config(base, seeds, smoke, passes, eval_every, val)
    if methods is None:
        methods = list(SMOKE_METHODS) if smoke else [m.name for m in list_methods()]
    singles, skipped = single_configs(base_cfg, methods)
    cfgs = {BASE_KEY: base_cfg, **singles}
    split = f"validation split ({base_cfg.data.val} digits)" if base_cfg.data.val else "test split"
    log(f"effects: base {base_cfg.name} ({base_cfg.train.passes} passes, {seeds} seeds, {split} every "
        f"{base_cfg.train.eval_every} passes), "
        f"{len(singles)} methods" + (f", {len(skipped)} skipped" if skipped else ""))
    describe = lambda k, res: f"{k}: test error {np.mean([f['test_error'] for f in res.final]):.2f}% " \
                              f"in {res.seconds / max(len(res.final), 1):.1f} s a seed"  # noqa: E731
    if runner is None:
        def runner(batch, label):
            return run_configs(batch, out, resume, jobs, log, lambda k, res: describe(
                f"{k[0]} at {k[1]}" if isinstance(k, tuple) else k, res), label=label)
    results = runner(cfgs, "effects runs")
    rows = analyse(results, BASE_KEY)
    bcfgs, bres = {}, {}
    if multipliers:
        bcfgs = budget_configs(cfgs)
        log(f"effects: {len(bcfgs)} runs at {', '.join(map(str, MULTIPLIER_BUDGETS))} of the passes for the "
            f"multipliers")
        bres = runner(bcfgs, "budget runs")
    chosen = top_pairs(rows, top_k, lambda a, b: not pair_configs(base_cfg, [(a, b)])[1]) if pairs is None \
        else list(pairs)
    for a, b in chosen:
        for m in (a, b):
            if m not in singles:
                raise UserError(f"pair {a}+{b}: {m} is not among the measured single methods")
    pcfgs, pskip = pair_configs(base_cfg, chosen)
    skipped.update(pskip)
    if pcfgs:
        log(f"effects: {len(pcfgs)} pairs: {', '.join(pcfgs)}")
        results.update(runner(pcfgs, "effects pairs"))
        cfgs.update(pcfgs)
        rows = analyse(results, BASE_KEY)
    if multipliers:
        add_multipliers(rows, results, cfgs, bres, bcfgs, n_boot)
        results.update({f"{k}@{f}": r for (k, f), r in bres.items()})  # stored with the others
        cfgs.update({f"{k}@{f}": c for (k, f), c in bcfgs.items()})
    return rows, compose(rows), skipped, results, cfgs
