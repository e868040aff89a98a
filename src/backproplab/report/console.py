"""Terminal output: a progress bar on stderr (only on a terminal) and result tables."""
import sys
import time

import numpy as np

PUBLISHED_1989 = [
    ("LeCun et al. 1989 (paper)", 0.14, 10, 5.00, 102),
    ("lecun1989-repro 2022 (public)", 0.62, 45, 4.09, 82),
]


class ProgressBar:
    def __init__(self, passes: int, stream=None, width: int = 30):
        self.stream = stream or sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.passes, self.width, self.t0, self.cur = passes, width, time.perf_counter(), None

    def __call__(self, pass_idx: int, done: int, total: int):
        if not self.enabled:
            return
        if self.cur != pass_idx:
            self.cur, self.t0 = pass_idx, time.perf_counter()
        frac = done / max(total, 1)
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        self.stream.write(f"\rpass {pass_idx + 1}/{self.passes} [{bar}] {done}/{total} {rate:,.0f} ex/s ")
        self.stream.flush()

    def clear(self):
        if self.enabled:
            self.stream.write("\r" + " " * (self.width + 60) + "\r")
            self.stream.flush()


def _fmt(vals, digits=2, pct=True):
    vals = np.asarray(vals, dtype=float)
    unit = "%" if pct else ""
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}{unit}" if pct else str(int(vals[0]))
    return f"{vals.mean():.{digits}f}{unit} +- {vals.std(ddof=1):.{digits}f}"


def repro_table(result, published: bool = True) -> str:
    """published: add the 1989 paper's and the public reproduction's rows (for the 1989 setup)."""
    f = result.final
    label = f"this run ({result.config['train']['engine']}, {len(f)} seed{'s' if len(f) > 1 else ''})"
    rows = [("", "train error", "misses", "test error", "misses")]
    for name, tre, trm, tee, tem in (PUBLISHED_1989 if published else ()):
        rows.append((name, f"{tre:.2f}%", str(trm), f"{tee:.2f}%", str(tem)))
    rows.append((label, _fmt([r["train_error"] for r in f]), _fmt([r["train_misses"] for r in f], 1, False),
                 _fmt([r["test_error"] for r in f]), _fmt([r["test_misses"] for r in f], 1, False)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    tail = (f"{result.seconds:.1f} s training ({result.seconds / max(len(result.history), 1):.2f} s a pass), "
            f"{result.eval_seconds:.1f} s evaluation")
    return "\n".join(lines + [tail])
