"""Safe checkpoints and divergence: the previous good checkpoint is used when the newest is
damaged, a checkpoint of another config or model is refused naming what differs, temporary
files of killed writers go away, and NaN/Inf in the weights or the loss stops a run, is
recorded, stays final on resume, and lets a ladder go on with the next rung.
"""
import json
import math
import os
import stat
import types
from pathlib import Path

import numpy as np
import pytest

from backproplab.cli import main
from backproplab.config import apply_overrides, preset
from backproplab.engine import checkpoint as ckmod
from backproplab.engine import train as trainmod
from backproplab.engine.checkpoint import atomic_write_bytes, read_checkpoint, save_checkpoint
from backproplab.engine.train import checkpoint_path, train
from backproplab.errors import UserError
from backproplab.experiments import ladder, ladder_report
from backproplab.store import list_runs

MODERN = ["model.act=relu", "model.out_act=none", "train.loss=ce", "optim.name=adamw", "optim.lr=1e-3",
          "optim.lr_end=1e-4", "optim.weight_decay=0.01"]
TINY = ["train.engine=fast", "data.n_train=60", "train.passes=4", "train.seeds=2", "train.shift=1"] + MODERN


def _cfg(overrides):
    return apply_overrides(preset("smoke"), ["data.n_test=60", *overrides])


def _metrics(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "seconds_total")} for h in history]  # wall clock


def _no_training(pass_idx, done, total):
    raise AssertionError(f"a finished run trained again (pass {pass_idx + 1})")


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


# ---- durability: fsync of the file before its rename, of the folder after it ---------
def _record_syncs(monkeypatch):
    """checkpoint.py's fsyncs and renames, in order: ("fsync", inode, is_folder) and
    ("replace", inode of the file moved, target path)."""
    events = []

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", st.st_ino, stat.S_ISDIR(st.st_mode)))
        return os.fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, Path(dst)))
        return os.replace(src, dst)
    fake = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    fake.fsync, fake.replace = fsync, replace
    monkeypatch.setattr(ckmod, "os", fake)
    return events


def _assert_durable(events, target, writes):
    # SIGKILL leaves the page cache alone, so the kill tests cannot see a missing fsync; a
    # power cut can: a renamed file whose data never reached the disk, or a rename that
    # never did (the folder not synced), loses the checkpoint. Between two renames onto
    # target the file moved must have been fsynced, and the folder after each.
    folder = os.stat(target.parent).st_ino
    at = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == target]
    assert len(at) == writes, events
    for n, i in enumerate(at):
        since_last = events[at[n - 1] + 1 if n else 0:i]
        assert ("fsync", events[i][1], False) in since_last, f"write {n + 1}: file not fsynced before its rename"
        until_next = events[i + 1:at[n + 1] if n + 1 < len(at) else len(events)]
        assert ("fsync", folder, True) in until_next, f"write {n + 1}: folder not fsynced after the rename"


def test_every_checkpoint_write_fsyncs_the_file_and_the_folder(tmp_path, monkeypatch):
    events = _record_syncs(monkeypatch)
    cfg = _cfg(TINY)
    train(cfg, out=tmp_path)
    ck = checkpoint_path(cfg, tmp_path)
    _assert_durable(events, ck, cfg.train.passes)
    # the kept previous checkpoint is no new copy to sync: it is the file synced as the newest one write ago
    moved = [e[1] for e in events if e[0] == "replace" and e[2] == ck]
    assert os.stat(ckmod.prev_path(ck)).st_ino == moved[-2]
    # atomic_write_bytes alone (the scaling study's sweep files and fit report)
    events.clear()
    report = tmp_path / "report.json"
    for body in (b"{}", b"[1]"):
        atomic_write_bytes(report, body)
    _assert_durable(events, report, 2)
    assert report.read_bytes() == b"[1]"


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


def _poison_train_loss(monkeypatch, bad_pass, value):
    """The real evaluation, with replica 1's training loss in pass bad_pass replaced by value:
    a loss that is NaN or Inf while every weight stays finite (an overflow in the loss alone)."""
    real = trainmod._evaluate_pass

    def evaluate_pass(engine, data, cfg, p, dt, **kw):
        rec = real(engine, data, cfg, p, dt, **kw)
        if p + 1 == bad_pass:
            rec["train"][1]["loss"] = value
        return rec
    monkeypatch.setattr(trainmod, "_evaluate_pass", evaluate_pass)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_loss_with_finite_weights_stops_the_run(tmp_path, monkeypatch, bad):
    cfg = _cfg(TINY)
    _poison_train_loss(monkeypatch, 2, bad)
    res = train(cfg, out=tmp_path)
    assert res.status == "diverged", res.message
    assert res.message == f"diverged in pass 2: NaN/Inf loss (seeds [{cfg.train.seed + 1}])"
    assert [h["pass"] for h in res.history] == [1, 2]
    assert all(np.isfinite(v).all() for prm in res.params for v in prm.values())  # the weight check saw nothing
    again = train(cfg, out=tmp_path, resume=True, progress=_no_training)
    assert (again.status, again.message) == (res.status, res.message)


def test_repro_with_a_nan_loss_is_one_line_exit_3_and_stored(tmp_path, capsys, monkeypatch):
    _poison_train_loss(monkeypatch, 2, math.nan)
    code = main(["repro", "--preset", "smoke", "--out", str(tmp_path), "--json", "--quiet", "data.n_test=60", *TINY])
    out, err = capsys.readouterr()
    assert code == 3 and len(err.splitlines()) == 1, (code, err)
    assert err.startswith("error: diverged in pass 2: NaN/Inf loss") and "weights" not in err, err
    assert json.loads(out.splitlines()[-1])["status"] == "diverged"
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
