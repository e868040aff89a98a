"""Safe checkpoints and divergence: the previous good checkpoint is used when the newest is
damaged, a checkpoint of another config or model is refused naming what differs, temporary
files of killed writers go away, and NaN/Inf in the weights or the loss stops a run, is
recorded, stays final on resume, and lets a ladder go on with the next rung.
"""
import json
import os

import pytest

from backproplab.cli import main
from backproplab.config import apply_overrides, preset
from backproplab.engine import checkpoint as ckmod
from backproplab.engine.checkpoint import read_checkpoint, save_checkpoint
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
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


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
