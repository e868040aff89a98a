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

Kill points: the engines and recipes in CASES, every method of the methods registry (a new
method is tested the moment it is registered), the smoke ladder and a few real CLI
processes; each runs rounds of kills until it has its number.
"""
import contextlib
import hashlib
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

from backproplab.config import apply_overrides, preset
from backproplab.data import load_dataset
from backproplab.engine import checkpoint as ckmod
from backproplab.engine.checkpoint import read_checkpoint
from backproplab.engine.train import train
from backproplab.experiments import ladder_report
from backproplab.methods.registry import get_method, list_methods
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
    # methods composed on a population, with train()'s shift and dropout streams
    "hooked-population-methods": (["train.engine=hooked", "train.batch=16", "data.n_train=64", "train.passes=3",
                                   "train.seeds=2", "model.dropout=0.25", "train.shift=1", "optim.lr=0.05",
                                   "+method=sam", "+method=swa:start=0", "+method=batchnorm",
                                   "+method=resblocks", "+method=stochastic_depth", "+method=rotate_scale"], 15),
}
METHOD_KILLS = 2                  # per registered method (42 now: 84)
LADDER_KILLS, CLI_KILLS = 20, 4   # with CASES and the methods: 308 kill points at least


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
def _kill_rounds(name, cfg, data, target, memdir, warm=True):
    ref, t_full = _timed(lambda: train(cfg, out=memdir / "ref", data=data))  # uninterrupted; warms kernels
    if warm:  # a second, warm run sets the kill delays
        again, t_full = _timed(lambda: train(cfg, out=memdir / "ref2", data=data))
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


@pytest.mark.parametrize("name", sorted(CASES))
def test_killed_anywhere_resumes_bit_identical(name, memdir):
    overrides, target = CASES[name]
    cfg = _cfg(overrides)
    _kill_rounds(name, cfg, load_dataset(cfg.data.source, cfg.data.n_train, cfg.data.n_test), target, memdir)


# Every registered training method alone on a small hooked run, the moment it is registered.
METHOD_BASE = ["data.n_train=48", "data.n_test=32", "train.passes=3", "train.batch=16", "model.dropout=0",
               "train.shift=0", "optim.lr_end=none", "optim.name=sgd", "optim.lr=0.05"]
METHOD_SPEC = {"swa": "swa:start=0", "ema": "ema:decay=0.5", "adam_sgd": "adam_sgd:at=0.5"}  # active early
METHOD_LR = {"sdlm": "optim.lr=5e-4"}  # the 1989 optimizer's step is lr / (mu + curvature)


@pytest.fixture(scope="module")
def method_data():
    return load_dataset("mnist10k", 48, 32)


@pytest.mark.parametrize("name", [m.name for m in list_methods()])
def test_method_killed_anywhere(name, memdir, method_data):
    req = get_method(name).requires
    items = METHOD_BASE + [METHOD_LR.get(name, "optim.lr=0.05"), f"+method={METHOD_SPEC.get(name, name)}"]
    cfg = apply_overrides(preset("modern_smoke"), items + ([f"+method={req[0]}"] if req else []))
    _kill_rounds(f"method-{name}", cfg, method_data, METHOD_KILLS, memdir, warm=False)


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
