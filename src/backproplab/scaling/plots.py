"""Scaling-law plots (PNG, matplotlib Agg). Without matplotlib each returns None (the
project's policy: a missing plot is a notice, never a failed fit)."""
from pathlib import Path

import numpy as np

from ..report.plots import _plt
from .fit import frontier_indices
from .runs import as_runs


def _legend(ax, **kw):
    if ax.get_legend_handles_labels()[0]:      # matplotlib warns on an empty legend
        ax.legend(**kw)


def _save(fig, plt, path) -> str:
    from matplotlib.ticker import NullFormatter
    for ax in fig.axes:                        # minor labels on a log axis spanning < 2 decades overlap
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":
                axis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path if hasattr(path, "write") else str(Path(path))  # a file object: drawn into memory


def loss_vs_compute(runs, frontiers: dict, path) -> str | None:
    """All runs (colour = log N, marker = family), each family's envelope and fitted line.
    frontiers: family -> frontier() dict."""
    plt = _plt()
    if plt is None:
        return None
    runs = as_runs(runs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "os^Dv<>p"
    sc = None
    for m, fam in zip(markers * 4, runs.families()):
        r = runs.take(np.flatnonzero(runs.family == fam))
        sc = ax.scatter(r.C, r.loss, c=np.log10(r.N), cmap="viridis", marker=m, s=16, alpha=0.55,
                        label=f"{fam} runs")
        env = frontier_indices(r.C, r.loss)
        ax.plot(r.C[env], r.loss[env], "k" + m, ms=5, mfc="none")
        fr = frontiers.get(fam)
        if fr and fr.get("slope") is not None and np.isfinite(fr["slope"]):
            Cg = np.geomspace(r.C.min(), r.C.max(), 50)
            lo, hi = fr["slope_ci"]
            ax.plot(Cg, np.exp(fr["intercept"]) * Cg ** fr["slope"], lw=1.5,
                    label=f"{fam} frontier: slope {fr['slope']:.3f} [{lo:.3f}, {hi:.3f}]")
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="log10 N (parameters)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("validation loss")
    ax.set_title("Loss vs compute: lower envelope (open markers) and its power-law fit")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, fontsize=7)
    return _save(fig, plt, path)


def isoflop_curves(runs, iso: dict, path) -> str | None:
    """Left: loss vs N per compute bin with the fitted parabolas and their minima.
    Right: N_opt (and D_opt) vs C with the fitted power laws."""
    plt = _plt()
    if plt is None:
        return None
    runs = as_runs(runs)
    edges = np.array(iso["log_C_edges"])
    b = np.clip(np.searchsorted(edges, np.log(runs.C), side="right") - 1, 0, len(edges) - 2)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    cmap = plt.get_cmap("plasma")
    prof = iso["profiles"]["N"]
    for k, bn in enumerate(prof["bins"]):
        m = b == k
        if not m.any():
            continue
        col = cmap(k / max(len(prof["bins"]) - 1, 1))
        ax.plot(runs.N[m], runs.loss[m], "o", color=col, ms=3, alpha=0.6)
        if bn["N_opt"] is not None:
            c0, c1, c2 = bn["parabola"]
            u = np.linspace(np.log(runs.N[m]).min(), np.log(runs.N[m]).max(), 40)
            ax.plot(np.exp(u), c0 + c1 * u + c2 * u * u, "-", color=col, lw=1,
                    label=f"C {bn['C']:.1e}" if k % 2 == 0 else None)
            ax.plot(bn["N_opt"], bn["loss_opt"], "k*", ms=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("validation loss")
    ax.set_title("IsoFLOP profiles (star = parabola minimum)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, fontsize=6, ncol=2)
    for name, mk in (("N", "o"), ("D", "s"), ("epochs", "^")):
        p = iso["profiles"].get(name)
        if not p:
            continue
        pts = [(bn["C"], bn[f"{name}_opt"]) for bn in p["bins"] if bn[f"{name}_opt"] is not None]
        if not pts:
            continue
        C, x = np.array(pts).T
        lab = f"{name}_opt"
        if p["exponent"] is not None and np.isfinite(p["exponent"]):
            lo, hi = p["exponent_ci"]
            lab += f" ~ C^{p['exponent']:.3f} [{lo:.3f}, {hi:.3f}]"
        pts = ax2.plot(C, x, mk, label=lab)
        if p["exponent"] is not None and np.isfinite(p["exponent"]):
            ax2.plot(C, np.exp(p["intercept"]) * C ** p["exponent"], "-", lw=1, color=pts[0].get_color())
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("training compute C (FLOPs)")
    ax2.set_ylabel("compute-optimal value")
    ax2.set_title("Compute-optimal N, D (epochs) from the profiles")
    ax2.grid(alpha=0.3, which="both")
    _legend(ax2, fontsize=7)
    return _save(fig, plt, path)


def chinchilla_contours(fit, runs, path) -> str | None:
    """Contours of the fitted L(N, D) over log N x log D, the runs, iso-compute lines and
    the compute-optimal allocation N*(C), D*(C)."""
    plt = _plt()
    if plt is None:
        return None
    runs = as_runs(runs)
    lN, lD = np.log10(runs.N), np.log10(runs.D)
    nx = np.linspace(lN.min() - 0.5, lN.max() + 0.5, 120)
    dy = np.linspace(lD.min() - 0.5, lD.max() + 0.5, 120)
    NN, DD = np.meshgrid(10 ** nx, 10 ** dy)
    Lg = fit.predict(NN, DD)
    fig, ax = plt.subplots(figsize=(6.8, 5))
    cs = ax.contourf(NN, DD, np.log(Lg), levels=20, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="ln L(N, D) fitted")
    ax.scatter(runs.N, runs.D, c="w", s=10, edgecolors="k", linewidths=0.4, label="runs")
    Cs = np.geomspace(runs.C.min(), runs.C.max(), 40)
    Nopt, Dopt, _ = fit.optimal(Cs)
    p = fit.params
    d = fit.to_dict()["compute_optimal"]
    ax.plot(Nopt, Dopt, "r-", lw=2, label=f"compute-optimal: N* ~ C^{d['N_opt_exponent']:.2f}, "
                                          f"D* ~ C^{d['D_opt_exponent']:.2f}")
    for C in np.geomspace(runs.C.min(), runs.C.max(), 5):
        Nl = 10 ** nx
        ax.plot(Nl, C / (fit.k * Nl ** fit.gamma), "w--", lw=0.6, alpha=0.7)
    ax.set_xlim(NN.min(), NN.max())
    ax.set_ylim(DD.min(), DD.max())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("training examples seen D")
    ax.set_title(f"L = {p['E']:.3g} + {p['A']:.3g}/N^{p['alpha']:.3f} + {p['B']:.3g}/D^{p['beta']:.3f}\n"
                 f"(dashed: equal compute, C = {fit.k:.3g} N^{fit.gamma:.2f} D)", fontsize=9)
    _legend(ax, fontsize=7, loc="upper left")
    return _save(fig, plt, path)


def lr_vs_epochs(lr: dict, path) -> str | None:
    """Best learning rate per cell vs epoch budget, one line per model size (geometric mean
    over training-set sizes); cells whose best lr is at the edge of the tried range are open
    markers."""
    plt = _plt()
    if plt is None:
        return None
    rows = [r for r in lr["table"] if r["epochs"] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    sizes = sorted({r["N"] for r in rows})
    cmap = plt.get_cmap("viridis")
    for i, N in enumerate(sizes):
        rr = [r for r in rows if r["N"] == N]
        col = cmap(i / max(len(sizes) - 1, 1))
        # A cell per training-set size at each budget: the line is their geometric mean,
        # the markers (nudged sideways by size so they do not hide each other) the cells.
        ep = sorted({r["epochs"] for r in rr})
        mean = [np.exp(np.mean([np.log(r["best_lr"]) for r in rr if r["epochs"] == e])) for e in ep]
        ax.plot(ep, mean, "-", color=col, lw=1.2, label=f"N = {N:.3g}")
        nudge = 1.0 + 0.03 * (i - (len(sizes) - 1) / 2)
        for r in rr:
            ax.plot(r["epochs"] * nudge, r["best_lr"], "o", ms=4, color=col, mfc="none" if r["at_edge"] else col,
                    alpha=0.7)
    f = lr.get("fit", {})
    if f.get("epochs_exponent") is not None:
        lo, hi = f["epochs_exponent_ci"]
        ax.set_title(f"Best learning rate: lr* ~ epochs^{f['epochs_exponent']:.2f} [{lo:.2f}, {hi:.2f}]"
                     + (f", N^{f['N_exponent']:.2f}" if f.get("N_exponent") is not None else ""), fontsize=9)
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("epoch budget")
    ax.set_ylabel("best learning rate (open: at edge of grid)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, fontsize=7, ncol=2)
    return _save(fig, plt, path)
