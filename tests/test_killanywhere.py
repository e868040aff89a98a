"""Kill-anywhere: a run killed by SIGKILL at any instant resumes to the bit-identical result.

The test process has torch, numba and the kernels loaded (its uninterrupted reference
run warms them) and then forks children that run train(..., resume=True) in one folder
(a fork costs milliseconds, a fresh python with torch 1-2 s). Each child dies by SIGKILL
either at a random time within a pass after it started or after its first checkpoint (it
tells the parent through a pipe), or at a random file operation of a checkpoint write:
before or after an fsync, link or rename, or half-way through a write. After every kill,
the newest checkpoint x.pt of every run that ever wrote one must exist and load by itself
(the README promises that x.pt is at every instant the old or the new complete file; the
fallback to x.prev.pt is tested in tests/test_checkpoints.py). When a child finally exits
cleanly, the checkpoint must hold exactly the weights (weights_sha256) and per-pass
metrics of the uninterrupted run. Each kill records the pass it landed in, and the kills
of a test must have landed all over the run (assert_kills_spread). Kill instants come
from a generator seeded with BACKPROPLAB_KILL_SEED and every assertion message lists them.

Kill points: the engines and recipes in CASES, every method of the methods registry (a new
method is tested the moment it is registered), the smoke ladder and a few real CLI
processes; each runs rounds of kills until it has its number.
"""
import contextlib
import hashlib
import math
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
from backproplab.engine import train as trainmod
from backproplab.engine.checkpoint import read_checkpoint
from backproplab.engine.train import train
from backproplab.experiments import ladder_report
from backproplab.methods.registry import get_method, list_methods
from backproplab.store import list_runs
from conftest import ROOT
from _teacher import teacher_dir

SEED = int(os.environ.get("BACKPROPLAB_KILL_SEED", "1989"))
IO_SHARE = 0.35          # share of kills placed at a checkpoint file operation rather than at a time
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
LADDER_KILLS, CLI_KILLS = 20, 7   # with CASES and the methods: 311 kill points at least


def _cfg(overrides):
    return apply_overrides(preset("smoke"), ["data.n_test=60", *overrides])


def _metrics(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "seconds_total")} for h in history]  # wall clock


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


def _report_checkpoints(pipe) -> None:
    """In a child: one byte to the parent now (it runs) and one after every checkpoint
    train() writes, so that a timed kill can be placed in any pass of the child's run."""
    real = trainmod.save_checkpoint

    def save_checkpoint(*args, **kw):
        real(*args, **kw)
        os.write(pipe, b"c")
    trainmod.save_checkpoint = save_checkpoint
    os.write(pipe, b"!")


def _child(run, how, errfile, pipe):
    code = 0
    try:
        if how[0] == "io":
            _arm_io_kill(how[1], how[2])
        _report_checkpoints(pipe)
        run()
    except BaseException:  # noqa: BLE001 - reported by the parent with the kill list
        with open(errfile, "w") as f:
            f.write(traceback.format_exc())
        code = 3
    os._exit(code)


def _start(run, how, errfile):
    """Fork a child running run(); -> (pid, the read end of its pipe, kept open until it exits)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(run, how, errfile, w)
    os.close(w)
    return pid, r


def _wait_for(r, n: int) -> bool:
    """Until the child has sent n bytes (started, then checkpoints); False if it exited first."""
    while n > 0:
        got = os.read(r, n)
        if not got:
            return False
        n -= len(got)
    return True


def child_pass_seconds(run, passes, errfile) -> float:
    """An uninterrupted child's time per checkpointed pass, from its start to its last
    checkpoint (the fork and the first copy-on-write page faults, 10-30 ms, are not in it):
    the span in which a timed kill lands after the child's start or a checkpoint."""
    pid, r = _start(run, ("none",), errfile)
    try:
        assert _wait_for(r, 1)
        t0 = time.perf_counter()
        assert _wait_for(r, passes), "fewer checkpoints than passes"
        seconds = (time.perf_counter() - t0) / passes
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(r)
    err = errfile.read_text() if errfile.exists() else ""
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"uninterrupted child failed:\n{err}"
    return seconds


def kill_until_done(run, rng, t_pass, passes, errfile, inspect, earlier=()) -> list:
    """Fork children running run() (passes in all) until one exits cleanly; inspect(kills)
    checks the folder after each kill and returns how many passes are checkpointed there.

    A timed kill comes a random time within a pass (t_pass) after the child started or after
    its first checkpoint, each as often as the other over these kills and the earlier ones;
    a file-operation kill in one of the child's next two checkpoint writes. So a kill costs
    about a pass, and as a round resumes further they land in every pass of the run, before
    and after a child's own first checkpoint. -> the kills, each with the pass the child
    resumed at and the pass it died in (the first one not checkpointed after the kill):
    ('time', 1, 0.012, 2, 3) killed 12 ms after its first checkpoint; ('io', 7, True, 2, 2)
    after its 7th checkpoint file operation (a write: write, fsync, link, two renames, a
    folder fsync; the first write neither links nor renames a previous file)."""
    kills, done = [], 0
    for _ in range(MAX_CHILDREN):
        if done == passes and rng.random() < 0.5:
            how = ("none",)  # all checkpointed: a child that resumes and finishes ends the round
        elif rng.random() < IO_SHARE and done < passes:
            how = ("io", rng.randint(1, 6 * min(2, passes - done) - (2 if done == 0 else 0)), rng.random() < 0.5)
        else:  # after the last checkpoint the child may finish first, ending the round
            after = [k[1] for k in (*earlier, *kills) if k[0] == "time"]
            j = min(int(after.count(1) < after.count(0)), passes - done)
            how = ("time", j, round(rng.uniform(0.0, t_pass), 4))
        pid, r = _start(run, how, errfile)
        try:
            if how[0] == "time" and _wait_for(r, 1 + how[1]):
                time.sleep(how[2])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        finally:
            os.close(r)
        if os.WIFSIGNALED(status):
            assert os.WTERMSIG(status) == signal.SIGKILL
            kills.append(how + (done + 1, "?"))
            now = inspect(kills)
            kills[-1] = how + (done + 1, now + 1)
            done = now
            continue
        err = errfile.read_text() if errfile.exists() else ""
        assert os.WEXITSTATUS(status) == 0, f"child failed after kills {kills} (seed {SEED}):\n{err}"
        return kills
    raise AssertionError(f"no child finished in {MAX_CHILDREN} attempts; kills {kills} (seed {SEED})")


def assert_kills_spread(kills, passes, what):
    """The kills landed in at least half of the passes, and a quarter of the timed ones (of
    those in a run not yet fully checkpointed) after the killed child's own first checkpoint.
    Kills timed from the fork landed before it 85-100% of the time: they test the start of a
    resumed run over and over, and the rest of it only through the file operations."""
    landed = sorted({k[-1] for k in kills if k[-1] <= passes})
    msg = f"{what}: kills landed in passes {landed} of {passes}; kills {kills} (seed {SEED})"
    assert len(landed) >= math.ceil(passes / 2), msg
    running = [k for k in kills if k[0] == "time" and k[-2] <= passes]
    assert 4 * sum(k[-1] > k[-2] for k in running) >= len(running), f"{msg}: timed ones before a first checkpoint"


def newest_checkpoints_load(folder, kills, seen: set, finished: dict | None = None, passes: int = 2) -> int:
    """After a kill: the newest checkpoint x.pt of every run that ever completed one exists
    (x.prev.pt, or seen in an earlier look) and loads on its own, without the fallback to
    x.prev.pt that would hide a moment with no x.pt. finished (of several runs, such as a
    ladder's rungs, each of `passes`): name -> digest of a finished run's checkpoint, which
    must never change again. -> passes checkpointed, all runs."""
    files = {f.name for f in (folder / "checkpoints").glob("*.pt")}
    seen |= {n[:-len(".prev.pt")] + ".pt" for n in files if n.endswith(".prev.pt")}
    missing = sorted(seen - files)
    assert not missing, f"{missing} missing after kills {kills} (seed {SEED})"
    done = 0
    for name in sorted(files):
        if name.endswith(".prev.pt"):
            continue
        seen.add(name)
        raw = (folder / "checkpoints" / name).read_bytes()
        try:
            n = int(read_checkpoint(folder / "checkpoints" / name)["passes_done"])
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{name} unusable after kills {kills} (seed {SEED}): {e}") from None
        if finished is not None and n == passes:
            digest = hashlib.sha256(raw).hexdigest()
            assert finished.setdefault(name, digest) == digest, \
                f"finished run {name} trained again; kills {kills} (seed {SEED})"
        done += n
    return done


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
    passes = cfg.train.passes
    ref, t_run = _timed(lambda: train(cfg, out=memdir / "ref", data=data))  # uninterrupted; warms kernels
    t_pass = t_run / passes
    if warm:  # a warm child's run sets the kill delays; it must end as the reference did
        t_pass = child_pass_seconds(lambda: train(cfg, out=memdir / "ref2", data=data), passes,
                                    memdir / "child-error.txt")
        again = train(cfg, out=memdir / "ref2", resume=True, data=data, progress=_no_training)
        assert [f["weights_sha256"] for f in again.final] == [f["weights_sha256"] for f in ref.final]
    rng = random.Random(f"{SEED}-{name}")
    total, rnd = [], 0
    while len(total) < target:
        folder, seen = memdir / f"round{rnd}", set()
        kills = kill_until_done(lambda: train(cfg, out=folder, resume=True, data=data), rng, t_pass, passes,
                                memdir / "child-error.txt", lambda k: newest_checkpoints_load(folder, k, seen), total)
        got = train(cfg, out=folder, resume=True, data=data, progress=_no_training)
        msg = f"{name}, seed {SEED}, round {rnd}: kills {kills}"
        assert [f["weights_sha256"] for f in got.final] == [f["weights_sha256"] for f in ref.final], msg
        assert _metrics(got.history) == _metrics(ref.history), msg
        assert got.status == "finished", msg
        total += kills
        rnd += 1
    return total


@pytest.mark.parametrize("name", sorted(CASES))
def test_killed_anywhere_resumes_bit_identical(name, memdir):
    overrides, target = CASES[name]
    cfg = _cfg(overrides)
    kills = _kill_rounds(name, cfg, load_dataset(cfg.data.source, cfg.data.n_train, cfg.data.n_test), target,
                         memdir)
    assert_kills_spread(kills, cfg.train.passes, name)


# Every registered training method alone on a small hooked run, the moment it is registered.
METHOD_BASE = ["data.n_train=48", "data.n_test=32", "train.passes=3", "train.batch=16", "model.dropout=0",
               "train.shift=0", "optim.lr_end=none", "optim.name=sgd", "optim.lr=0.05"]
METHOD_SPEC = {"swa": "swa:start=0", "ema": "ema:decay=0.5", "adam_sgd": "adam_sgd:at=0.5"}  # active early
METHOD_FILL = {"distill": lambda: f"distill:teacher={teacher_dir()}"}  # a finished run to distill from
METHOD_LR = {"sdlm": "optim.lr=5e-4"}  # the 1989 optimizer's step is lr / (mu + curvature)


@pytest.fixture(scope="module")
def method_data():
    return load_dataset("mnist10k", 48, 32)


@pytest.mark.parametrize("name", [m.name for m in list_methods()])
def test_method_killed_anywhere(name, memdir, method_data):
    req = get_method(name).requires
    spec = METHOD_FILL[name]() if name in METHOD_FILL else METHOD_SPEC.get(name, name)
    items = METHOD_BASE + [METHOD_LR.get(name, "optim.lr=0.05"), f"+method={spec}"]
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
    t_pass = child_pass_seconds(lambda: run(memdir / "ref2", resume=False), 2 * len(rungs),
                                memdir / "child-error.txt")
    ref_store = {r["name"]: r for r in list_runs(memdir / "ref")}
    rng = random.Random(f"{SEED}-ladder")
    total, rnd = [], 0
    while len(total) < LADDER_KILLS:
        folder, finished, seen = memdir / f"round{rnd}", {}, set()

        def inspect(kills):
            done = newest_checkpoints_load(folder, kills, seen, finished, passes=2)  # smoke rungs train 2
            if (folder / "runs.db").exists():
                names = [r["name"] for r in list_runs(folder)]
                assert len(names) == len(set(names)), f"rung recorded twice: {names}; kills {kills}"
            return done
        kills = kill_until_done(lambda: run(folder), rng, t_pass, 2 * len(rungs), memdir / "child-error.txt",
                                inspect, total)
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
    assert_kills_spread(total, 2 * len(rungs), "ladder")  # passes of all rungs, one after the other


def test_cli_repro_killed_anywhere(tmp_path):
    """Real `python -m backproplab repro --resume` processes killed during training,
    checkpoint writes and the final records (a random time within a pass after the line of
    a random pass k), then resumed."""
    passes = 16
    over = ["train.engine=fast", "data.n_train=300", "data.n_test=100", f"train.passes={passes}"]
    ref = train(apply_overrides(preset("smoke"), over))  # in memory, no checkpoints at all
    args = [sys.executable, "-m", "backproplab", "repro", "--preset", "smoke", *over, "--out", str(tmp_path),
            "--resume"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    rng = random.Random(f"{SEED}-cli")
    # passes at least 2 apart: a kill after the line of pass k leaves pass k or k+1 to redo,
    # so the next process prints the line of the next k
    ks = [v + i for i, v in enumerate(sorted(rng.sample(range(1, passes - CLI_KILLS + 2), CLI_KILLS)))]
    gap = (ref.seconds + ref.eval_seconds) / passes  # until a process shows its own pace
    kills, seen = [], set()
    for k in ks:
        p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
        last, delay = None, None
        for line in p.stdout:
            if line.startswith("pass "):
                now = time.perf_counter()
                gap, last = (now - last if last is not None else gap), now
                if line.startswith(f"pass {k:3d}/"):
                    delay = round(rng.uniform(0.0, gap), 4)
                    time.sleep(delay)
                    p.kill()
                    break
        p.wait(timeout=120)
        kills.append((k, delay))
        assert p.returncode == -signal.SIGKILL, f"run ended before the kill after pass {k}; kills {kills}"
        kills[-1] += (newest_checkpoints_load(tmp_path, kills, seen) + 1,)  # the pass it died in
    assert len(kills) == CLI_KILLS
    r = subprocess.run(args + ["--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr
    runs = list_runs(tmp_path)
    assert len(runs) == 1, f"killed runs left records: kills {kills}"
    assert runs[0]["summary"]["weights_sha256"] == ref.final[0]["weights_sha256"], f"kills {kills} (seed {SEED})"
    assert _metrics(runs[0]["history"]) == _metrics(ref.history), f"kills {kills} (seed {SEED})"
