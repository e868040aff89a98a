"""PNG plots (matplotlib, Agg backend). matplotlib is the 'plots' extra: without it a
plot is skipped with a one-line notice, never a failed run."""
from pathlib import Path

import numpy as np


def _saved(path):
    """What a plot function returns: the path it wrote, or the file object (io.BytesIO) it drew into."""
    return path if hasattr(path, "write") else Path(path)


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def ladder_errors(rows, path) -> Path | None:
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(rows))
    ax.errorbar(x, [r["test_error"] for r in rows], yerr=[r["test_error_std"] for r in rows], fmt="o-",
                capsize=4, label="test error (mean +- std over seeds)")
    ax.plot(x, [r["train_error"] for r in rows], "s--", alpha=0.6, label="train error (mean)")
    ax.set_xticks(x, [f"rung {r['rung']}" for r in rows])
    ax.set_ylabel("error (%)")
    ax.set_title(f"Time travel: test error per rung ({rows[0]['seeds']} seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return _saved(path)


def learning_curves(curves: dict, path, ylabel="test error (%)") -> Path | None:
    """curves: label -> (passes (P,), values (seeds, P))."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (px, vals) in curves.items():
        vals = np.asarray(vals, dtype=float)
        m = vals.mean(0)
        ax.plot(px, m, label=label)
        if len(vals) > 1:
            s = vals.std(0, ddof=1)
            ax.fill_between(px, m - s, m + s, alpha=0.2)
    ax.set_xlabel("pass")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return _saved(path)


def digit_grid(images, true, pred, path, title="", cols=12) -> Path | None:
    """images (K, 16, 16) in [-1, 1]; each tile labelled 'pred/true'.

    One mosaic image with text labels (one axes, not one per digit: 20x faster to draw)."""
    plt = _plt()
    if plt is None:
        return None
    k = len(images)
    rows = max((k + cols - 1) // cols, 1)
    cell, pad, top = 16, 4, 9                          # pixels: digit, gap, label band
    h, w = rows * (cell + top + pad), cols * (cell + pad)
    mosaic = np.ones((h, w), dtype=np.float32)         # white paper (digits drawn dark)
    for i in range(k):
        r, c = divmod(i, cols)
        y, x = r * (cell + top + pad) + top, c * (cell + pad)
        mosaic[y:y + cell, x:x + cell] = -np.asarray(images[i], dtype=np.float32)
    fig, ax = plt.subplots(figsize=(cols * 0.9, rows * 1.05 + 0.4))
    ax.imshow(mosaic, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    for i in range(k):
        r, c = divmod(i, cols)
        ax.text(c * (cell + pad) + cell / 2, r * (cell + top + pad) + top - 1.5,
                f"{int(pred[i])}/{int(true[i])}", ha="center", va="bottom", fontsize=7, color="firebrick")
    ax.axis("off")
    ax.set_title(title or "misclassified test digits (predicted/true)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return _saved(path)


def loglog_errorbars(series: dict, path, xlabel, ylabel, title="") -> Path | None:
    """series: label -> (x (K,), mean (K,), std (K,))."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, (x, m, s) in series.items():
        ax.errorbar(x, m, yerr=s, fmt="o-", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return _saved(path)
