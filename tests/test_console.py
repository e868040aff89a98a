"""Progress bars (rich): drawn on a terminal with ETA, nested, silent under --json / --quiet and
off a terminal; tables: plain aligned text off a terminal, styled on one; the first run of the
fast kernels announced when numba's cache is cold."""
import io
import json
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from backproplab.cli import main
from backproplab.report import console as C
from backproplab.report import progress as P

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TINY = ["--preset", "smoke", "--engine", "eager", "data.n_train=120", "data.n_test=50", "train.passes=2"]


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _reset():
    yield
    P.configure()
    assert P._display is None and P._open == 0  # every bar of a test was closed


def _frames(buf) -> list[str]:
    return [ANSI.sub("", f) for f in re.split(r"[\r\n]", buf.getvalue()) if ANSI.sub("", f).strip()]


def _terminal():
    buf = FakeTTY()
    P.configure(console=Console(file=buf, force_terminal=True, width=120))
    return buf


def test_bars_nest_show_eta_and_close():
    buf = _terminal()
    with P.bar("ladder rungs", 2) as outer:
        for rung in range(2):
            inner = P.ProgressBar(3)
            for p in range(3):
                for done in (50, 100):
                    inner(p, done, 100)
                    P._display.refresh()
            inner.clear()
            outer.advance()
            P._display.refresh()
    frames = _frames(buf)
    assert any("pass 3/3" in f and "100%" in f for f in frames)
    assert any(f.startswith("ladder rungs 1/2") for f in frames)
    # nested: the bar of runs is drawn with the bar of passes under it in one frame
    text = ANSI.sub("", buf.getvalue())
    assert re.search(r"ladder rungs 0/2[^\n]*\n[^\n]*pass 1/3", text)
    assert all("ETA" in f for f in frames if "━" in f)
    assert P._display is None  # the last bar closed the display


@pytest.mark.parametrize("quiet, terminal", [(True, True), (False, False)])
def test_bars_are_silent_when_quiet_or_off_a_terminal(quiet, terminal):
    buf = FakeTTY() if terminal else io.StringIO()
    P.configure(quiet=quiet, console=Console(file=buf, force_terminal=terminal or None))
    assert not P.enabled()
    with P.bar("cells", 3) as b:
        b.advance()
        bar = P.ProgressBar(2)
        bar(0, 5, 10)
        bar.clear()
    assert buf.getvalue() == "" and P._display is None


@pytest.mark.parametrize("flag", [None, "--json", "--quiet"])
def test_the_cli_draws_a_bar_of_passes_on_a_terminal_only_without_json_or_quiet(tmp_path, monkeypatch, capsys,
                                                                              flag):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setattr(P, "Progress", _slow_refresh_progress(P.Progress))
    argv = ["repro", *TINY, "--out", str(tmp_path)] + ([flag] if flag else [])
    assert main(argv) == 0
    drawn = ANSI.sub("", tty.getvalue())
    if flag is None:
        assert "pass 2/2" in drawn and "ETA" in drawn
    else:
        assert "ETA" not in drawn and "━" not in drawn
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # stdout is not a terminal here: plain tables
    if flag == "--json":
        assert json.loads(out.strip().splitlines()[-1])["passes"] == 2


def _slow_refresh_progress(cls):
    """rich's Progress with a refresh on every update, so even a short run draws frames."""
    class Eager(cls):
        def update(self, *a, **k):
            super().update(*a, **k)
            self.refresh()
    return Eager


def test_tables_are_plain_and_aligned_off_a_terminal_and_styled_on_one():
    t = C.table(["name", ("error", "right")], [("base", "1.80%"), ("a much longer name", "12.25%")])
    plain = C.render(t, terminal=False).splitlines()
    assert "\x1b[" not in "".join(plain)
    head, rule, *rows = plain
    assert set(rule) == {"─"} and head.split() == ["name", "error"]
    assert rows[0].startswith("base ") and rows[1].startswith("a much longer name ")
    ends = {len(r) for r in [head, *rows]}
    assert len(ends) == 1  # right-justified numbers end in one column, and no trailing blanks
    assert all(r == r.rstrip() for r in plain)
    styled = C.render(t, terminal=True)
    assert "\x1b[1m" in styled and ANSI.sub("", styled).splitlines()[2].split() == ["base", "1.80%"]


def test_repro_table_lists_the_published_rows_and_this_run():
    class R:
        final = [{"train_error": 1.5, "train_misses": 109, "test_error": 5.2, "test_misses": 104},
                 {"train_error": 2.5, "train_misses": 182, "test_error": 6.2, "test_misses": 124}]
        config = {"train": {"engine": "fast"}}
        seconds, eval_seconds, history = 4.0, 1.0, [{}, {}]
    lines = C.repro_table(R()).splitlines()
    assert lines[2].startswith("LeCun et al. 1989 (paper)") and lines[2].split()[-4:] == ["0.14%", "10", "5.00%", "102"]
    assert lines[4].startswith("this run (fast, 2 seeds)")
    assert "2.00% +- 0.71" in lines[4] and "5.70% +- 0.71" in lines[4] and "145.5 +- 51.6" in lines[4]
    assert lines[-1] == "4.0 s training (2.00 s a pass), 1.0 s evaluation"


def test_a_cold_kernel_cache_is_detected_and_announced_once(tmp_path):
    # numba's cache in an empty folder: every kernel is cold (nothing compiled, nothing is compiled here)
    code = ("from backproplab.engine import warmup as w\n"
            "cold, where = w.cache_state()\n"
            "said = []\n"
            "w.__dict__['_prepared'] = False\n"
            "import backproplab.engine.kernelgrad as kg\n"
            "kg.warm_up = lambda: said.append('warm')\n"
            "w.prepare_kernels(said.append); w.prepare_kernels(said.append)\n"
            "print(sorted(cold)); print(where); print(len(said)); print(said[0]); print(said[1]); print(said[2])\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=str(C.__file__).rsplit("/backproplab/", 1)[0])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    cold, where, n, first, warm, last = r.stdout.strip().splitlines()
    assert cold == "['eval_pass', 'pop_pass', 'solo_grads', 'solo_pass']" and where.startswith(str(tmp_path))
    assert n == "3" and warm == "warm"  # announced, compiled, timed; the second call says nothing
    assert first.startswith("compiling the fast kernels") and last.startswith("compiled the fast kernels in ")


def test_no_bar_outlives_its_command_even_when_it_fails(capsys):
    _terminal()
    P.bar("left open by a command that failed", 3)
    assert P._display is not None
    assert main(["repro", "--bogus"]) == 2
    assert P._display is None and P._open == 0
