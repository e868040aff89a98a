"""Plots the report draws itself (the others are report/plots.py's, the effects Pareto plot
and scaling/plots.py's, drawn into memory): learning curves with every replica shown."""
import numpy as np

from .plots import _plt, _saved


def replica_curves(series: dict, path, title: str = "", ylabel: str = "test error (%)"):
    """series: label -> (passes (P,), values (R, P)): one thin line per replica, the mean bold.
    A log error axis when every value is positive (0% training error is common), else linear."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    positive = True
    for i, (label, (px, vals)) in enumerate(series.items()):
        vals = np.asarray(vals, dtype=float)
        c = colors[i % len(colors)]
        for row in vals:
            ax.plot(px, row, color=c, lw=0.7, alpha=0.35)
        ax.plot(px, vals.mean(0), color=c, lw=2, marker="o" if len(px) < 4 else None, ms=3,
                label=f"{label} (mean of {len(vals)})")
        positive &= bool(np.all(vals > 0))
    if positive:
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))   # labels at 1, 2, 5, 10, 20, ...
        ax.yaxis.set_major_formatter(ScalarFormatter())   # 2, 5, 10 rather than 2x10^0
        ax.yaxis.set_minor_formatter(NullFormatter())
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # passes are whole
    ax.set_xlabel("pass")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return _saved(path)
