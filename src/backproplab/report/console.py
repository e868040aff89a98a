"""Terminal output: result tables drawn by rich (plain text when stdout is not a terminal, so
what a pipe, a file or a test reads has no colour codes), and the progress bars (report/progress.py)."""
import io
import shutil
import sys

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .progress import ProgressBar, bar, note  # noqa: F401  (the engine's callback and the bars, re-exported)

def table(columns, rows, title: str | None = None) -> Table:
    """A rich table: columns are names, or (name, "left"|"right"); rows are sequences of values,
    shown as str (as text: brackets like "[0.1, 0.5]" are not read as rich markup)."""
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=title, title_justify="left",
              header_style="bold")
    for c in columns:
        name, justify = (c, "left") if isinstance(c, str) else c
        t.add_column(Text(name), justify=justify, no_wrap=True)
    for r in rows:
        t.add_row(*[Text(str(v)) for v in r])
    return t


def render(renderable, terminal: bool | None = None) -> str:
    """The text of a table (or any rich renderable): with colour when stdout is a terminal
    (terminal=None asks stdout), else plain text, never wrapped or cut, lines right-stripped."""
    if terminal is None:
        terminal = bool(getattr(sys.stdout, "isatty", lambda: False)())
    buf = io.StringIO()
    width = shutil.get_terminal_size((100, 24)).columns if terminal else 10_000
    Console(file=buf, width=width, force_terminal=terminal, color_system="auto" if terminal else None,
            highlight=False, soft_wrap=not terminal).print(renderable)
    return "\n".join(line.rstrip() for line in buf.getvalue().rstrip("\n").split("\n"))


PUBLISHED_1989 = [
    ("LeCun et al. 1989 (paper)", 0.14, 10, 5.00, 102),
    ("lecun1989-repro 2022 (public)", 0.62, 45, 4.09, 82),
]


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
    rows = []
    for name, tre, trm, tee, tem in (PUBLISHED_1989 if published else ()):
        rows.append((name, f"{tre:.2f}%", str(trm), f"{tee:.2f}%", str(tem)))
    rows.append((label, _fmt([r["train_error"] for r in f]), _fmt([r["train_misses"] for r in f], 1, False),
                 _fmt([r["test_error"] for r in f]), _fmt([r["test_misses"] for r in f], 1, False)))
    cols = [""] + [(c, "right") for c in ("train error", "misses", "test error", "misses")]
    tail = (f"{result.seconds:.1f} s training ({result.seconds / max(len(result.history), 1):.2f} s a pass), "
            f"{result.eval_seconds:.1f} s evaluation")
    return render(table(cols, rows)) + "\n" + tail
