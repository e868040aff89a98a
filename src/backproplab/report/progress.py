"""Progress bars on stderr, drawn by rich: ETA, nesting, and silence where a bar would be noise.

    with progress.bar("ladder rungs", total=5) as b:   # the outer bar
        for ...:
            train(cfg, progress=ProgressBar(passes))   # a bar of passes under it
            b.advance()

Every bar of a process shares one rich display, so bars opened while another is open stack
under it (a bar of runs over a bar of passes) and the display ends when the last bar closes.
Bars are drawn only when stderr is a terminal and the command was not given --json or
--quiet (cli.main calls configure); otherwise every call is a no-op, so callers never check.
"""
import sys

from rich.console import Console
from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

_quiet = False
_console = None      # None: a console on the process's stderr, made when first needed
_display = None      # the shared rich Progress while any bar is open
_open = 0


def configure(quiet: bool = False, console: Console | None = None) -> None:
    """quiet: no bars at all (--json, --quiet). console: where bars go (tests pass one that
    records); by default the process's stderr."""
    global _quiet, _console
    _quiet, _console = bool(quiet), console


def _get_console() -> Console:
    return _console if _console is not None else Console(stderr=True, soft_wrap=True)  # lines printed above
    # the bars are not re-wrapped by rich (the terminal wraps them)


def enabled() -> bool:
    """Bars are drawn: not quiet, and stderr (or the configured console) is a terminal."""
    return not _quiet and _get_console().is_terminal


COLUMNS = (TextColumn("{task.description}"), BarColumn(bar_width=30), TaskProgressColumn(), TimeElapsedColumn(),
           TextColumn("ETA"), TimeRemainingColumn())


def _acquire() -> Progress:
    global _display, _open
    if _display is None:
        console = _get_console()
        # printed lines go above the bars; stdout is taken over only when it shares the terminal,
        # so a redirected stdout keeps exactly what the command prints
        # redrawn 4 times a second by rich's thread (its clock and ETA keep moving while a pool's
        # workers train), and at once when a bar opens, closes, or a bar of runs moves
        _display = Progress(*COLUMNS, console=console, transient=True, refresh_per_second=4,
                            redirect_stdout=bool(getattr(sys.stdout, "isatty", lambda: False)()),
                            redirect_stderr=_console is None)
        _display.start()
    _open += 1
    return _display


def _draw() -> None:
    if _display is not None:
        _display.refresh()


def _release() -> None:
    global _display, _open
    _open -= 1
    if _open <= 0 and _display is not None:
        _display.stop()
        _display, _open = None, 0


def close_all() -> None:
    """End the display whatever is open (cli.main calls it when a command ends, also by an
    error or Ctrl-C), so the terminal gets its cursor back and no bar is left drawn."""
    global _display, _open
    if _display is not None:
        _display.stop()
    _display, _open = None, 0


class Bar:
    """One bar of the shared display; a no-op when bars are off. Use as a context manager, or
    call close(). With counts, the description reads "LABEL done/total"."""

    def __init__(self, description: str, total: float | None, counts: bool = True):
        self.label, self.total, self.counts, self.completed = description, total, counts, 0
        self._p = _acquire() if enabled() else None
        self._task = None if self._p is None else self._p.add_task(self._describe(), total=total)
        _draw()

    def _describe(self) -> str:
        if self.counts and self.total is not None:
            return f"{self.label} {self.completed:g}/{self.total:g}"
        return self.label

    @property
    def active(self) -> bool:
        return self._task is not None

    def update(self, completed: float | None = None, *, advance: float | None = None,
               description: str | None = None) -> None:
        self.completed = (self.completed if completed is None else completed) + (advance or 0)
        self.label = self.label if description is None else description
        if self._task is not None:
            self._p.update(self._task, completed=self.completed, description=self._describe())
            if self.counts:  # a bar of runs or cells moves rarely: drawn at once
                _draw()

    def advance(self, n: float = 1) -> None:
        self.update(advance=n)

    def set_total(self, total: float | None) -> None:
        """For a bar whose size is learnt while it runs (a study's trials)."""
        self.total = total
        if self._task is not None:
            self._p.update(self._task, total=total, description=self._describe())

    def close(self) -> None:
        if self._task is not None and self._p is not _display:   # the display was ended by close_all
            self._task = None
        if self._task is not None:
            self._p.remove_task(self._task)
            self._task = None
            _draw()
            _release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def bar(description: str, total: float | None) -> Bar:
    """A bar of `total` steps (runs, rungs, cells); advance() after each."""
    return Bar(description, total)


class ProgressBar:
    """The training engine's callback: train(..., progress=ProgressBar(passes)) calls
    bar(pass_idx, done, total) as a pass advances (done of total examples); clear() removes
    the bar (a later call draws it again). One bar over the whole run, so its ETA is the run's."""

    def __init__(self, passes: int, stream=None, label: str = "pass"):
        self.passes, self.label, self._bar = passes, label, None

    def __call__(self, pass_idx: int, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = Bar(f"{self.label} {pass_idx + 1}/{self.passes}", self.passes * total, counts=False)
        if self._bar.active:
            self._bar.update(pass_idx * total + done, description=f"{self.label} {pass_idx + 1}/{self.passes}")

    def clear(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def note(line: str) -> None:
    """One line on stderr, printed above any open bars."""
    if _display is not None:
        _display.console.print(line, highlight=False, markup=False, soft_wrap=True)
    else:
        print(line, file=sys.stderr, flush=True)
