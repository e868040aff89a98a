"""Pruning, 2:4 and low-rank studies on one dense start (Blalock et al. 2020's protocol).

Every study trains one dense population (the modern recipe, `passes` passes, data.val digits held
out of the training set), then fine-tunes copies of exactly those weights for the same number of
passes (`ft_passes`, AdamW from ft_lr decaying linearly to 1e-4) under each method and fraction of
weights kept. The fine-tuning rate is chosen among `ft_lrs` on the validation split (global
magnitude at 10% kept, the middle of the curve) and then used for every method; the test split is
evaluated once per run, at its end. "dense" is the dense net fine-tuned the same way (fraction 1.0).

curve    methods global, layerwise, random, structured (prune:criterion=..., one-shot at the start of
         the fine-tuning), gradual and iterative (global magnitude reached over the first 60% of the
         fine-tuning steps, Zhu & Gupta's cubic ramp or 3 prunings) and lottery (the global mask of
         the dense weights on the weights' step-0 values, Frankle & Carbin 2019, retrained for the
         same ft_passes), at each fraction kept; beside them dense members of the convnet
         family trained from scratch for passes + ft_passes, whose parameter counts span the
         pruned nets'.
nm       2:4 masks: prune-then-fine-tune from the dense net, and the mask from the start (from the
         initial weights, trained passes + ft_passes); parameters and multiply-adds removed.
lowrank  truncated SVD of H3 (ranks) and of the H1/H2 kernels (conv ranks), evaluated straight after
         the truncation and after ft_passes of fine-tuning in the rank-r set.
"""
import copy
import math
import time

import numpy as np
import torch

from ..config import apply_overrides, preset
from ..data import load_dataset
from ..engine.population import Population, train_passes
from ..errors import UserError
from ..methods.pruning import LOWRANK_LAYERS, Prune, factored_params, nm_layers, prunable, truncate
from ..models.convnet import conv_params, layer_specs
from .effects import welch

FRACTIONS = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02)
METHODS = ("global", "layerwise", "random", "structured", "lottery", "gradual", "iterative")
# gradual: global magnitude on Zhu & Gupta's cubic ramp over the first 60% of the fine-tuning steps;
# iterative: global magnitude in 3 prunings over the same 60% (each removing the same share of the rest)
SCHEDULED = {"gradual": "schedule=gradual,start=0,end=0.6", "iterative": "schedule=iterative,cycles=3,start=0,end=0.6"}
STUDIES = ("curve", "nm", "lowrank")
TOLERANCE = 0.3          # points of test error over dense: the target
PROBE = ("global", 0.1)  # where the fine-tuning rate is chosen (validation split)
LR_END = 1e-4


def parse_model(text: str) -> tuple:
    """'net1989' or 'convnet:K' -> (name, size)."""
    name, _, size = text.partition(":")
    if name == "net1989" and not size:
        return "net1989", 0
    if name == "convnet":
        try:
            k = int(size or 4)
        except ValueError:
            raise UserError(f"--models: {text!r}: convnet:K needs an integer size K") from None
        layer_specs(k)  # the family's own range check
        return "convnet", k
    raise UserError(f"--models: {text!r}: expected net1989 or convnet:K")


def recipe(model: tuple, passes: int, seeds: int, val: int, smoke: bool, over=()):
    name, size = model
    items = [f"train.passes={passes}", f"train.seeds={seeds}", f"data.val={val}", "train.eval_train=false"]
    if name == "convnet":
        items += ["model.name=convnet", f"model.depth={size}"]
    return apply_overrides(preset("modern_smoke" if smoke else "modern"), items + list(over))


def load_data(cfg):
    data = load_dataset(cfg.data.source, cfg.data.n_train, cfg.data.n_test)
    return data.with_validation(cfg.data.val) if cfg.data.val else data


def fit(cfg, data, W0=None) -> Population:
    """A population of cfg.train.seeds replicas trained cfg.train.passes passes (as train() does it:
    the same (seed, pass) shifts and dropout masks), from W0 (R, P) when given."""
    torch.set_num_threads(cfg.train.threads)
    seeds = [cfg.train.seed + k for k in range(cfg.train.seeds)]
    eng = Population(cfg, seeds)
    if W0 is not None:
        with torch.no_grad():
            eng.W.copy_(W0)
    train_passes(eng, data.train_x.reshape(-1, 16, 16).numpy(), data.train_labels.numpy(), cfg.train.passes)
    return eng


def errors(eng, data, splits=("val", "test")) -> dict:
    out = {}
    for sp in splits:
        x = getattr(data, f"{sp}_x")
        if x is not None:
            out[sp] = [m["error"] for m in eng.evaluate(x, getattr(data, f"{sp}_labels"), "ce")]
    return out


def weight_counts(eng) -> dict:
    """Per replica: prunable weights kept (nonzero), their total, and all nonzero parameters."""
    lay = prunable(eng.ctx)
    cols = torch.cat([torch.arange(a, b) for _, a, b, _ in lay])
    W = eng.W.detach()
    return {"kept": (W[:, cols] != 0).sum(1).tolist(), "weights": len(cols),
            "nonzero_params": (W != 0).sum(1).tolist(), "params": W.shape[1]}


def summarize(label: dict, eng, data, seconds: float) -> dict:
    e, c = errors(eng, data), weight_counts(eng)
    row = dict(label)
    row.update({"kept_fraction": float(np.mean(c["kept"]) / c["weights"]),
                "nonzero_params": float(np.mean(c["nonzero_params"])), "params": c["params"],
                "seeds": len(e["test"]), "seconds": round(seconds, 2)})
    for sp, v in e.items():
        row[f"{sp}_error"], row[f"{sp}_error_std"] = float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        row[f"{sp}_per_seed"] = v
    return row


def _ft(dense_cfg, ft_passes, lr, spec=None):
    c = copy.deepcopy(dense_cfg)
    c = apply_overrides(c, [f"train.passes={ft_passes}", f"optim.lr={lr}", f"optim.lr_end={LR_END}"]
                        + ([f"+method={spec}"] if spec else []))
    return c


def _prune_spec(method, keep):
    crit = "global" if method in ("lottery", "dense", *SCHEDULED) else method
    extra = "," + SCHEDULED[method] if method in SCHEDULED else ""
    return f"prune:criterion={crit},sparsity={1.0 - keep:.6g}{extra}"


def dense_start(model, seeds, passes, val, smoke, log):
    cfg = recipe(model, passes, seeds, val, smoke)
    data = load_data(cfg)
    t0 = time.perf_counter()
    eng = fit(cfg, data)
    dt = time.perf_counter() - t0
    log(f"dense {model[0]}{':' + str(model[1]) if model[1] else ''}: {passes} passes, {seeds} seeds, "
        f"{dt:.0f} s; val error {np.mean(errors(eng, data)['val']):.2f}%")
    return cfg, data, eng, dt


def choose_lr(cfg, data, W0, ft_passes, ft_lrs, log):
    """The fine-tuning rate with the lowest mean validation error at PROBE."""
    if len(ft_lrs) == 1:
        return ft_lrs[0], []
    tried = []
    for lr in ft_lrs:
        eng = fit(_ft(cfg, ft_passes, lr, _prune_spec(*PROBE)), data, W0)
        v = float(np.mean(errors(eng, data, ("val",))["val"]))
        tried.append({"ft_lr": lr, "val_error": v})
        log(f"  fine-tuning lr {lr:g}: validation error {v:.2f}% ({PROBE[0]}, {PROBE[1]:.0%} kept)")
    best = min(tried, key=lambda r: r["val_error"])["ft_lr"]
    return best, tried


def _targets(rows, dense_row):
    """Per method: the largest fraction removed whose mean test error is within TOLERANCE of dense,
    with the difference's 95% CI at that point."""
    out = {}
    for m in sorted({r["method"] for r in rows if r["method"] not in ("dense", "dense-small")}):
        ok = [r for r in rows if r["method"] == m and r["test_error"] <= dense_row["test_error"] + TOLERANCE]
        if not ok:
            out[m] = {"removed": 0.0, "note": "no fraction within tolerance"}
            continue
        best = min(ok, key=lambda r: r["kept_fraction"])
        d, lo, hi, p = welch(best["test_per_seed"], dense_row["test_per_seed"])
        out[m] = {"removed": 1.0 - best["kept_fraction"], "kept_target": best["keep"],
                  "compression": 1.0 / best["kept_fraction"], "diff": d, "ci": [lo, hi], "p": p}
    return out


def run_curve(model, methods, fractions, seeds, passes, ft_passes, ft_lrs, val, smoke, log=print,
              small_sizes=None) -> dict:
    cfg, data, dense, dense_s = dense_start(model, seeds, passes, val, smoke, log)
    W0 = dense.W.detach().clone()
    lr, tried = choose_lr(cfg, data, W0, ft_passes, ft_lrs, log)
    init_W = Population(cfg, dense.seeds).W.detach().clone() if "lottery" in methods else None
    rows = []

    def one(method, keep):
        spec = _prune_spec(method, keep)
        start = W0
        if method == "lottery":  # the dense net's global mask on the step-0 weights
            sw = Prune(dict(criterion="global", sparsity=1.0 - keep, schedule="oneshot", start=0.0, end=0.0,
                            cycles=1, rewind="none", rewind_pass=0))
            start = init_W * sw.new_mask(dense.ctx, 1.0 - keep)
        t0 = time.perf_counter()
        eng = fit(_ft(cfg, ft_passes, lr, spec), data, start)
        row = summarize({"model": _mname(model), "method": method, "keep": keep}, eng, data,
                        time.perf_counter() - t0)
        log(f"  {method:10s} keep {keep:5.2f} (measured {row['kept_fraction']:.3f}): test {row['test_error']:.2f}"
            f" +- {row['test_error_std']:.2f}%  val {row['val_error']:.2f}%  {row['seconds']:.0f} s")
        return row

    dense_row = one("dense", 1.0)
    dense_row["method"] = "dense"
    rows.append(dense_row)
    for m in methods:
        for f in fractions:
            if f < 1.0:
                rows.append(one(m, f))
    # dense nets of the scaling family from scratch, same total passes, sizes spanning the pruned counts
    if small_sizes is None:
        lo = min(r["nonzero_params"] for r in rows)
        small_sizes = [k for k in range(1, 9) if conv_params(k) < dense_row["params"] * 0.95]
        small_sizes = [k for k in small_sizes if conv_params(k) >= lo * 0.5] or [1]
    for k in small_sizes:
        c = recipe(("convnet", k), passes + ft_passes, seeds, val, smoke)
        t0 = time.perf_counter()
        eng = fit(c, data)
        row = summarize({"model": _mname(model), "method": "dense-small", "keep": None, "size": k}, eng, data,
                        time.perf_counter() - t0)
        log(f"  dense convnet:{k} ({row['params']} params) from scratch, {passes + ft_passes} passes: test "
            f"{row['test_error']:.2f} +- {row['test_error_std']:.2f}%")
        rows.append(row)
    return {"study": "curve", "model": _mname(model), "seeds": seeds, "passes": passes, "ft_passes": ft_passes,
            "ft_lr": lr, "ft_lr_tried": tried, "val": val, "dense_seconds": round(dense_s, 1), "rows": rows,
            "targets": _targets([r for r in rows if r["method"] != "dense-small"], dense_row),
            "tolerance_points": TOLERANCE}


def _mname(model):
    return model[0] + (f":{model[1]}" if model[1] else "")


# -- 2:4 ------------------------------------------------------------------------------------------------
def macs_per_weight(cfg) -> dict:
    """Multiply-adds one weight does per image: its output positions (Net1989 shares kernels)."""
    if cfg.model.name == "net1989":
        return {"h1_w": 64, "h2_w": 16, "h3_w": 1, "out_w": 1}
    return {f"{s['name']}_w": s["side"] ** 2 for s in layer_specs(cfg.model.depth)}


def nm_savings(eng, cfg) -> dict:
    per = macs_per_weight(cfg)
    W = eng.W.detach()[0]
    total_w = removed_w = total_m = removed_m = 0
    for n, a, b, _ in prunable(eng.ctx):
        z = int((W[a:b] == 0).sum())
        total_w, removed_w = total_w + (b - a), removed_w + z
        total_m, removed_m = total_m + (b - a) * per[n], removed_m + z * per[n]
    return {"weights": total_w, "weights_removed": removed_w, "macs": total_m, "macs_removed": removed_m,
            "dense_layers": [n for n, a, b, s in prunable(eng.ctx) if n not in {x[0] for x in nm_layers(eng.ctx, 4)}]}


def cuda_24_timing(eng) -> dict | None:
    """Where a CUDA device is present: H3 (or the widest layer) as a 2:4 sparse fp16 matrix
    against the dense one, batch 4096, median of 20 (torch.sparse.to_sparse_semi_structured)."""
    if not torch.cuda.is_available():
        return None
    from torch.sparse import to_sparse_semi_structured
    n, a, b, sh = max(nm_layers(eng.ctx, 4), key=lambda t: t[2] - t[1])
    w = eng.W.detach()[0, a:b].reshape(sh[0], -1)
    rows, cols = 64 * math.ceil(w.shape[0] / 64), 64 * math.ceil(w.shape[1] / 64)  # the kernels' tile sizes
    dense = torch.zeros(rows, cols, dtype=torch.float16, device="cuda")
    dense[:w.shape[0], :w.shape[1]] = w.half().cuda()
    sparse = to_sparse_semi_structured(dense)
    x = torch.randn(cols, 4096, dtype=torch.float16, device="cuda")

    def med(f):
        ts = []
        for _ in range(20):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            f()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        return float(np.median(ts))
    td, ts = med(lambda: dense @ x), med(lambda: sparse @ x)
    return {"layer": n, "dense_ms": td, "sparse_ms": ts, "speedup": td / ts}


def run_nm(model, seeds, passes, ft_passes, ft_lr, val, smoke, log=print) -> dict:
    cfg, data, dense, dense_s = dense_start(model, seeds, passes, val, smoke, log)
    W0 = dense.W.detach().clone()
    rows, timing = [], None
    for label, c, start in [("dense", _ft(cfg, ft_passes, ft_lr, "prune:sparsity=0"), W0),
                            ("2:4 prune then fine-tune", _ft(cfg, ft_passes, ft_lr, "nm_sparse"), W0),
                            ("2:4 from the start", apply_overrides(copy.deepcopy(cfg), [
                                f"train.passes={passes + ft_passes}", "+method=nm_sparse"]), None)]:
        t0 = time.perf_counter()
        eng = fit(c, data, start)
        row = summarize({"model": _mname(model), "method": label}, eng, data, time.perf_counter() - t0)
        row.update(nm_savings(eng, c))
        log(f"  {label:26s} test {row['test_error']:.2f} +- {row['test_error_std']:.2f}%  weights removed "
            f"{row['weights_removed']}/{row['weights']}  MACs removed {row['macs_removed']}/{row['macs']}")
        rows.append(row)
        if label.startswith("2:4 prune"):
            timing = cuda_24_timing(eng)
    for r in rows[1:]:
        d, lo, hi, p = welch(r["test_per_seed"], rows[0]["test_per_seed"])
        r["vs_dense"] = {"diff": d, "ci": [lo, hi], "p": p}
    return {"study": "nm", "model": _mname(model), "seeds": seeds, "passes": passes, "ft_passes": ft_passes,
            "ft_lr": ft_lr, "rows": rows, "cuda_timing": timing,
            "cpu_note": "no CPU kernel here runs 2:4 sparse weights faster than dense: the savings are counts"}


# -- low rank -----------------------------------------------------------------------------------------
def lowrank_params(eng, ranks: dict) -> int:
    """All parameters with the factorized layers stored as r (m + n)."""
    total = eng.W.shape[1]
    for n, r in ranks.items():
        sh = tuple(eng.ctx.views[n].shape[1:])
        total += factored_params(sh, r) - int(np.prod(sh))
    return total


def run_lowrank(seeds, passes, ft_passes, ft_lr, val, smoke, h3_ranks, conv_ranks, log=print) -> dict:
    model = ("net1989", 0)
    cfg, data, dense, dense_s = dense_start(model, seeds, passes, val, smoke, log)
    W0 = dense.W.detach().clone()
    combos = [(r, 0) for r in h3_ranks] + [(0, r) for r in conv_ranks]
    for r, c in combos:  # bad ranks are named before anything trains
        apply_overrides(copy.deepcopy(cfg), [f"+method=lowrank:h3={r},conv={c}"])
    rows = []
    base = summarize({"model": "net1989", "method": "dense", "h3": 30, "conv": 12, "fine_tuned": False},
                     dense, data, 0.0)
    base["factored_params"] = dense.W.shape[1]
    rows.append(base)
    for r, c in combos:
        ranks = {n: (r if k == "h3" else c) for k, names in LOWRANK_LAYERS.items() for n in names
                 if (r if k == "h3" else c) > 0}
        with torch.no_grad():   # the truncation alone, no fine-tuning
            for n, rk in ranks.items():
                v = dense.ctx.views[n]
                v.copy_(truncate(v.reshape(v.shape[0], v.shape[1], -1), rk).reshape(v.shape))
        row = summarize({"model": "net1989", "method": "lowrank", "h3": r, "conv": c, "fine_tuned": False},
                        dense, data, 0.0)
        row["factored_params"] = lowrank_params(dense, ranks)
        rows.append(row)
        with torch.no_grad():
            dense.W.copy_(W0)
        t0 = time.perf_counter()
        eng = fit(_ft(cfg, ft_passes, ft_lr, f"lowrank:h3={r},conv={c}"), data, W0)
        row2 = summarize({"model": "net1989", "method": "lowrank", "h3": r, "conv": c, "fine_tuned": True},
                         eng, data, time.perf_counter() - t0)
        row2["factored_params"] = row["factored_params"]
        rows.append(row2)
        log(f"  h3 rank {r or 'dense':>5} conv rank {c or 'dense':>5}: {row['factored_params']} params; test "
            f"{row['test_error']:.2f}% truncated, {row2['test_error']:.2f} +- {row2['test_error_std']:.2f}% "
            f"fine-tuned {ft_passes} passes")
    return {"study": "lowrank", "model": "net1989", "seeds": seeds, "passes": passes, "ft_passes": ft_passes,
            "ft_lr": ft_lr, "rows": rows}


# -- plots -----------------------------------------------------------------------------------------------
def plot_curve(res: dict, path) -> str | None:
    from ..report.plots import _plt
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    rows = res["rows"]
    dense = next(r for r in rows if r["method"] == "dense")
    for m in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        rr = sorted([r for r in rows if r["method"] == m], key=lambda r: r["kept_fraction"])
        ax.errorbar([r["kept_fraction"] for r in rr], [r["test_error"] for r in rr],
                    yerr=[r["test_error_std"] for r in rr], fmt="o-", capsize=3, label=m)
    small = [r for r in rows if r["method"] == "dense-small"]
    if small:
        ax.errorbar([r["params"] / dense["params"] for r in small], [r["test_error"] for r in small],
                    yerr=[r["test_error_std"] for r in small], fmt="k^--", capsize=3,
                    label="dense convnet of that parameter count")
    ax.axhline(dense["test_error"], color="gray", lw=1, label=f"dense ({dense['test_error']:.2f}%)")
    ax.axhline(dense["test_error"] + TOLERANCE, color="gray", lw=1, ls=":", label=f"dense + {TOLERANCE}")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("fraction of weights kept (pruned nets) / parameters vs dense (dense convnets)")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"pruning {res['model']}: {res['seeds']} seeds, {res['passes']} + {res['ft_passes']} passes")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_lowrank(res: dict, path) -> str | None:
    from ..report.plots import _plt
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    rows = res["rows"]
    for ft, style in ((False, "s--"), (True, "o-")):
        for which in ("h3", "conv"):
            rr = sorted([r for r in rows if r["method"] == "lowrank" and r["fine_tuned"] == ft
                         and r[which] > 0], key=lambda r: r["factored_params"])
            if rr:
                ax.plot([r["factored_params"] for r in rr], [r["test_error"] for r in rr], style,
                        label=f"{which} rank, {'fine-tuned' if ft else 'truncated only'}")
    d = rows[0]
    ax.plot([d["factored_params"]], [d["test_error"]], "k*", ms=10, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (factorized layers as r (m + n))")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"low rank net1989: {res['seeds']} seeds, fine-tuning {res['ft_passes']} passes")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
