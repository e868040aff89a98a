"""Kill-anywhere: a run killed by SIGKILL at any instant resumes to the bit-identical result.

The test process has torch, numba and the kernels loaded (its uninterrupted reference
run warms them) and then forks children that run train(..., resume=True) in one folder
(a fork costs milliseconds, a fresh python with torch 1-2 s). Each child dies by SIGKILL
either after a random delay or at a random file operation of a checkpoint write: before
or after an fsync, link or rename, or half-way through a write. After every kill, the
newest checkpoint of every run in the folder must load. When a child finally exits
cleanly, the checkpoint must hold exactly the weights (weights_sha256) and per-pass
metrics of the uninterrupted run. Kill instants come from a generator seeded with
BACKPROPLAB_KILL_SEED and every assertion message lists them.

Kill points: the CASES below (a methods registry adds its entries to CASES), the ladder
and a few real CLI processes; each runs rounds until it has its number of kills.
"""
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import pytest

from backproplab.cli import main
from backproplab.config import apply_overrides, preset
from backproplab.data import load_dataset
from backproplab.engine import checkpoint as ckmod
from backproplab.engine.checkpoint import read_checkpoint, save_checkpoint
from backproplab.engine.train import checkpoint_path, train
from backproplab.errors import UserError
from backproplab.experiments import ladder, ladder_report
from backproplab.store import list_runs
from conftest import ROOT

SEED = int(os.environ.get("BACKPROPLAB_KILL_SEED", "1989"))
IO_SHARE = 0.35          # share of kills placed at a checkpoint file operation rather than at a time
TIME_SHARE = 0.5         # timed kills fall in [0, TIME_SHARE x an uninterrupted run's seconds]
MAX_CHILDREN = 300       # per round; a run that never finishes is a failure, not a hang

FAST = ["train.engine=fast"]
MODERN = ["model.act=relu", "model.out_act=none", "train.loss=ce", "optim.name=adamw", "optim.lr=1e-3",
          "optim.lr_end=1e-4", "optim.weight_decay=0.01"]
CASES = {  # name -> (overrides of the smoke preset, kill points)
    "fast-solo": (FAST + ["data.n_train=150", "train.passes=6"], 50),
    # 17 replicas: one full block on the population kernel and one replica on the solo kernel
    "fast-population": (FAST + ["data.n_train=60", "train.passes=4", "train.seeds=17"], 30),
    "fast-dropout-shift-adamw": (FAST + MODERN + ["data.n_train=120", "train.passes=5", "train.seeds=2",
                                                  "train.shift=1", "model.dropout=0.25", "train.eval_every=2"], 30),
    "eager": (["train.engine=eager", "data.n_train=30", "train.passes=4"], 20),
    "eager-sdlm": (["train.engine=eager", "optim.name=sdlm", "optim.lr=0.0005", "model.act=scaled_tanh",
                    "model.out_act=scaled_tanh", "data.n_train=20", "train.passes=3"], 10),
    # batch 16 over 100 examples: a carry-over of 4 trained at the end of every pass
    "minibatch-net1989": (["train.engine=minibatch", "train.batch=16", "data.n_train=100", "train.passes=4",
                           "train.seeds=2"] + MODERN, 25),
    "minibatch-vit": (["train.engine=minibatch", "model.name=vit", "train.batch=16", "data.n_train=72",
                       "train.passes=4", "train.seeds=2", "train.shift=1", "model.dropout=0.1"] + MODERN, 20),
}
LADDER_KILLS, CLI_KILLS = 20, 4  # with CASES: 209 kill points at least


def _cfg(overrides):
    return apply_overrides(preset("smoke"), ["data.n_test=60", *overrides])


def _metrics(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _no_training(pass_idx, done, total):
    raise AssertionError(f"a finished run trained again (pass {pass_idx + 1})")


# ---- the harness ---------------------------------------------------------------------
def _arm_io_kill(n: int, after: bool) -> None:
    """In a child: checkpoint.py's n-th write/fsync/link/replace kills the process (a write
    half-done; other calls before or after they happen)."""
    count = [0]

    def wrap(name, real):
        def op(*args):
            count[0] += 1
            if count[0] != n:
                return real(*args)
            if name == "write":
                real(args[0], bytes(args[1][:len(args[1]) // 2]))
            elif after:
                real(*args)
            os.kill(os.getpid(), signal.SIGKILL)
        return op
    fake = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    for name in ("write", "fsync", "link", "replace"):
        setattr(fake, name, wrap(name, getattr(os, name)))
    ckmod.os = fake


def _child(run, how, errfile):
    code = 0
    try:
        if how[0] == "io":
            _arm_io_kill(how[1], how[2])
        run()
    except BaseException:  # noqa: BLE001 - reported by the parent with the kill list
        with open(errfile, "w") as f:
            f.write(traceback.format_exc())
        code = 3
    os._exit(code)


def kill_until_done(run, rng, t_full, io_ops, errfile, inspect=None) -> list:
    """Fork children running run() until one exits cleanly; -> the kills, e.g. ('time', 0.031)
    or ('io', 7, True) (the 7th file operation, killed after it)."""
    kills = []
    for _ in range(MAX_CHILDREN):
        if rng.random() < IO_SHARE:
            how = ("io", rng.randint(1, io_ops), rng.random() < 0.5)
        else:
            how = ("time", round(rng.uniform(0.0, TIME_SHARE * t_full), 4))
        pid = os.fork()
        if pid == 0:
            _child(run, how, errfile)
        if how[0] == "time":
            time.sleep(how[1])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            assert os.WTERMSIG(status) == signal.SIGKILL
            kills.append(how)
            if inspect:
                inspect(kills)
            continue
        err = errfile.read_text() if errfile.exists() else ""
        assert os.WEXITSTATUS(status) == 0, f"child failed after kills {kills} (seed {SEED}):\n{err}"
        return kills
    raise AssertionError(f"no child finished in {MAX_CHILDREN} attempts; kills {kills} (seed {SEED})")


def _newest_checkpoints_load(folder, kills):
    for f in (folder / "checkpoints").glob("*.pt"):
        if not f.name.endswith(".prev.pt"):
            try:
                read_checkpoint(f)
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"{f.name} unusable after kills {kills} (seed {SEED}): {e}") from None


@pytest.fixture
def memdir(tmp_path):
    """A folder in memory (tmpfs) where there is one. SIGKILL leaves the page cache intact, so
    fsync buys nothing against it, and under disk contention each fsync here took ~0.3 s;
    the CLI test below kills processes writing to the real disk."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(dir=shm, prefix="backproplab-kill-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _timed(fn):
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0


# ---- training runs -------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_killed_anywhere_resumes_bit_identical(name, memdir):
    overrides, target = CASES[name]
    cfg = _cfg(overrides)
    data = load_dataset(cfg.data.source, cfg.data.n_train, cfg.data.n_test)
    ref = train(cfg, out=memdir / "ref", data=data)  # uninterrupted; also warms the kernels before forking
    again, t_full = _timed(lambda: train(cfg, out=memdir / "ref2", data=data))  # warm: sets the kill delays
    assert [f["weights_sha256"] for f in again.final] == [f["weights_sha256"] for f in ref.final]
    rng = random.Random(f"{SEED}-{name}")
    io_ops = 5 * cfg.train.passes  # a checkpoint write: write, fsync, link, 2 renames
    total, rnd = [], 0
    while len(total) < target:
        folder = memdir / f"round{rnd}"
        kills = kill_until_done(lambda: train(cfg, out=folder, resume=True, data=data), rng, t_full, io_ops,
                                memdir / "child-error.txt", lambda k: _newest_checkpoints_load(folder, k))
        got = train(cfg, out=folder, resume=True, data=data, progress=_no_training)
        msg = f"{name}, seed {SEED}, round {rnd}: kills {kills}"
        assert [f["weights_sha256"] for f in got.final] == [f["weights_sha256"] for f in ref.final], msg
        assert _metrics(got.history) == _metrics(ref.history), msg
        assert got.status == "finished", msg
        total += kills
        rnd += 1


def test_ladder_killed_anywhere(memdir, monkeypatch):
    """Smoke ladder, rungs in one process: finished rungs never re-run, every rung recorded once."""
    # Plots are redrawn from the results on every run and are not what is tested (the
    # 96-digit grid alone takes ~10 s to draw); the training and the store are.
    monkeypatch.setattr(ladder_report, "make_plots", lambda *a, **k: [])
    rungs, seeds = ["1", "2", "4", "5"], 2

    def run(folder, resume=True):
        return ladder_report.run_and_report(rungs, seeds, folder, resume, 1, True, "mnist10k",
                                            log=lambda s: None, engine="fast")
    ref = run(memdir / "ref", resume=False)
    _, t_full = _timed(lambda: run(memdir / "ref2", resume=False))
    ref_store = {r["name"]: r for r in list_runs(memdir / "ref")}
    rng = random.Random(f"{SEED}-ladder")
    total, rnd = [], 0
    while len(total) < LADDER_KILLS:
        folder, finished = memdir / f"round{rnd}", {}

        def inspect(kills):
            _newest_checkpoints_load(folder, kills)
            for f in (folder / "checkpoints").glob("*.pt"):
                if f.name.endswith(".prev.pt"):
                    continue
                raw = f.read_bytes()
                if read_checkpoint(f)["passes_done"] == 2:  # smoke rungs train 2 passes
                    digest = hashlib.sha256(raw).hexdigest()
                    assert finished.setdefault(f.name, digest) == digest, \
                        f"finished rung {f.name} trained again; kills {kills} (seed {SEED})"
            if (folder / "runs.db").exists():
                names = [r["name"] for r in list_runs(folder)]
                assert len(names) == len(set(names)), f"rung recorded twice: {names}; kills {kills}"
        kills = kill_until_done(lambda: run(folder), rng, t_full, 5 * 2 * len(rungs),
                                memdir / "child-error.txt", inspect)
        msg = f"ladder, seed {SEED}, round {rnd}: kills {kills}"
        got = run(folder)  # all rungs finished: loads them, trains and records nothing
        assert [r["weights_sha256"] for r in got["rungs"]] == [r["weights_sha256"] for r in ref["rungs"]], msg
        store = {r["name"]: r for r in list_runs(folder)}
        assert len(list_runs(folder)) == len(rungs) and set(store) == set(ref_store), msg
        for k, r in store.items():
            timing = ("seconds", "eval_seconds")
            assert {a: b for a, b in r["summary"].items() if a not in timing} == \
                   {a: b for a, b in ref_store[k]["summary"].items() if a not in timing}, msg
            assert _metrics(r["history"]) == _metrics(ref_store[k]["history"]), msg
        total += kills
        rnd += 1


def test_cli_repro_killed_anywhere(tmp_path):
    """Real `python -m backproplab repro --resume` processes killed during training and
    checkpoint writes (at a random instant after the line of pass k), then resumed."""
    over = ["train.engine=fast", "data.n_train=300", "data.n_test=100", "train.passes=16"]
    ref = train(apply_overrides(preset("smoke"), over))  # in memory, no checkpoints at all
    args = [sys.executable, "-m", "backproplab", "repro", "--preset", "smoke", *over, "--out", str(tmp_path),
            "--resume"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    rng = random.Random(f"{SEED}-cli")
    kills = []
    for k in (2, 6, 10, 13):  # a resumed run starts at or after pass k+1, so it reaches the next k
        extra = round(rng.uniform(0.0, 0.01), 4)
        p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
        for line in p.stdout:
            if line.startswith(f"pass {k:3d}/"):
                time.sleep(extra)
                p.kill()
                break
        p.wait(timeout=120)
        kills.append((k, extra))
        assert p.returncode == -signal.SIGKILL, f"run ended before the kill after pass {k}; kills {kills}"
    assert len(kills) == CLI_KILLS
    r = subprocess.run(args + ["--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr
    runs = list_runs(tmp_path)
    assert len(runs) == 1, f"killed runs left records: kills {kills}"
    assert runs[0]["summary"]["weights_sha256"] == ref.final[0]["weights_sha256"], f"kills {kills} (seed {SEED})"
    assert _metrics(runs[0]["history"]) == _metrics(ref.history), f"kills {kills} (seed {SEED})"


# ---- checkpoint files ----------------------------------------------------------------
def _run_until(cfg, out, stop_at):
    """Train until pass index stop_at begins (checkpoints of passes 1..stop_at on disk)."""
    def progress(p, done, total):
        if p == stop_at:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=out, progress=progress)
    return checkpoint_path(cfg, out)


DAMAGE = {"none": None, "flip": lambda b: b[:-20] + bytes([b[-20] ^ 1]) + b[-19:],
          "truncate": lambda b: b[: len(b) // 3], "empty": lambda b: b"", "delete": "delete"}


def _damage(path, how):
    if DAMAGE[how] == "delete":
        path.unlink()
    elif DAMAGE[how]:
        path.write_bytes(DAMAGE[how](path.read_bytes()))


TINY = FAST + ["data.n_train=60", "train.passes=4", "train.seeds=2"] + MODERN + ["train.shift=1"]


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, capsys, how):
    cfg = _cfg(TINY)
    ref = train(cfg)
    ck = _run_until(cfg, tmp_path, 3)
    _damage(ck, how)
    capsys.readouterr()
    seen = set()
    got = train(cfg, out=tmp_path, resume=True, progress=lambda p, d, t: seen.add(p))
    err = capsys.readouterr().err.splitlines()
    assert [f["weights_sha256"] for f in got.final] == [f["weights_sha256"] for f in ref.final]
    assert _metrics(got.history) == _metrics(ref.history)
    if how == "none":  # resume trains only the passes after the checkpoint: no replay
        assert seen == {3} and err == []
    else:
        assert seen == {2, 3} and len(err) == 1 and err[0].startswith("warning:"), err
        assert ck.name in err[0] and ".prev.pt (after pass 2)" in err[0]


@pytest.mark.parametrize("change, words", [
    (["optim.lr=0.002"], "optim.lr: 0.001 in the checkpoint, 0.002 now"),
    (["train.engine=minibatch", "model.name=vit"], "model.name: 'net1989' in the checkpoint, 'vit' now"),
])
def test_checkpoint_of_another_config_is_refused_naming_the_difference(tmp_path, change, words):
    cfg, other = _cfg(TINY), _cfg(TINY + change)
    other.name = cfg.name
    ck = _run_until(cfg, tmp_path, 2)
    checkpoint_path(other, tmp_path).write_bytes(ck.read_bytes())
    with pytest.raises(UserError, match=f"different config .*{words}"):
        train(other, out=tmp_path, resume=True)


def test_checkpoint_whose_state_does_not_fit_the_model_is_refused(tmp_path):
    vit = _cfg(["train.engine=minibatch", "model.name=vit", "data.n_train=32", "train.passes=2"])
    net = _cfg(["train.engine=minibatch", "data.n_train=32", "train.passes=2"])
    state = read_checkpoint(_run_until(vit, tmp_path, 1))
    state["config"] = net.to_json()  # a forged file: the right config, another model's weights
    save_checkpoint(checkpoint_path(net, tmp_path), state)
    with pytest.raises(UserError, match="does not fit this model"):
        train(net, out=tmp_path, resume=True)


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    cfg = _cfg(TINY)
    ck = _run_until(cfg, tmp_path, 1)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that is surely gone
    for stale in (f".{ck.name}.tmp.{pid}", f".{ckmod.prev_path(ck).name}.tmp.{pid}"):
        (ck.parent / stale).write_bytes(b"half a checkpoint")
    train(cfg, out=tmp_path, resume=True)
    assert sorted(p.name for p in ck.parent.iterdir()) == sorted([ck.name, ckmod.prev_path(ck).name])
    ckmod.remove_checkpoint(ck)  # a caller done with a run deletes both files
    assert list(ck.parent.iterdir()) == [] and not ckmod.has_checkpoint(ck)


# ---- divergence ----------------------------------------------------------------------
BLOWUP = ["model.act=relu", "model.out_act=none", "train.loss=ce", "optim.lr=100", "data.n_train=60",
          "train.passes=4", "train.eval_every=4"]


@pytest.mark.parametrize("engine", ["fast", "eager", "minibatch"])
def test_nan_weights_stop_the_run_at_once_and_stay_stopped(tmp_path, engine):
    cfg = _cfg([f"train.engine={engine}", *BLOWUP])
    res = train(cfg, out=tmp_path)
    # found in pass 1 by the weight check, though the loss is only evaluated every 4 passes
    assert res.status == "diverged" and res.message.startswith("diverged in pass 1: NaN/Inf weights")
    assert [h["pass"] for h in res.history] == [1]
    again = train(cfg, out=tmp_path, resume=True, progress=_no_training)
    assert (again.status, again.message) == (res.status, res.message)
    assert json.dumps(again.history) == json.dumps(res.history)  # NaN losses included


def test_repro_divergence_is_one_line_exit_3_and_stored(tmp_path, capsys):
    code = main(["repro", "--preset", "smoke", "--engine", "fast", "--out", str(tmp_path), "--json", "--quiet",
                 *BLOWUP])
    out, err = capsys.readouterr()
    assert code == 3 and len(err.splitlines()) == 1 and err.startswith("error: diverged in pass 1"), err
    assert "Traceback" not in err and json.loads(out.splitlines()[-1])["status"] == "diverged"
    assert [r["status"] for r in list_runs(tmp_path)] == ["diverged"]


def test_ladder_goes_on_after_a_diverged_rung(tmp_path, monkeypatch):
    real = ladder.rung_config

    def rung_config(rung, *a, **k):
        cfg = real(rung, *a, **k)
        if rung == "2":  # unbounded units and a huge step: overflow in the first pass
            cfg.model.act, cfg.optim.lr = "relu", 100.0
        return cfg
    monkeypatch.setattr(ladder, "rung_config", rung_config)
    monkeypatch.setattr(ladder_report, "make_plots", lambda *a, **k: [])
    run = lambda resume: ladder_report.run_and_report(["1", "2", "3"], 1, tmp_path, resume, 1, True,  # noqa: E731
                                                       "mnist10k", log=lambda s: None, engine="fast")
    first = run(False)
    assert [r["status"] for r in first["rungs"]] == ["finished", "diverged", "finished"]
    assert sorted(r["status"] for r in list_runs(tmp_path)) == ["diverged", "finished", "finished"]
    again = run(True)
    assert [r["weights_sha256"] for r in again["rungs"]] == [r["weights_sha256"] for r in first["rungs"]]
    assert len(list_runs(tmp_path)) == 3  # nothing recorded twice, the diverged rung included
