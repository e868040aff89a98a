import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from backproplab.config import apply_overrides, preset
from backproplab.engine.checkpoint import MAGIC, load_checkpoint, save_checkpoint
from backproplab.engine.train import checkpoint_path, train
from backproplab.errors import UserError
from backproplab.store import add_run, list_runs

from _helpers import strip_paths
from conftest import ROOT


def tiny(engine="eager", **kw):
    over = [f"train.engine={engine}", "data.n_train=150", "data.n_test=60", "train.passes=3"]
    over += [f"{k}={v}" for k, v in kw.items()]
    return apply_overrides(preset("smoke"), over)


class Stop(Exception):
    pass


def _stopper(after_pass):
    def progress(pass_idx, done, total):
        if pass_idx == after_pass:  # the checkpoint of pass `after_pass` is on disk by now
            raise Stop
    return progress


@pytest.mark.parametrize("kw", [{}, {"train.seeds": 2, "train.shift": 1, "model.dropout": 0.25,
                                     "model.act": "relu", "model.out_act": "none", "train.loss": "ce",
                                     "optim.name": "adamw", "optim.lr": 1e-3, "optim.lr_end": 1e-4}])
def test_resume_is_bit_identical(tmp_path, kw):
    cfg = tiny(**kw)
    full = train(cfg)
    with pytest.raises(Stop):
        train(cfg, out=tmp_path, progress=_stopper(1))
    assert load_checkpoint(checkpoint_path(cfg, tmp_path))["passes_done"] == 1
    resumed = train(cfg, out=tmp_path, resume=True)
    assert [f["weights_sha256"] for f in resumed.final] == [f["weights_sha256"] for f in full.final]
    assert [h["test"] for h in resumed.history] == [h["test"] for h in full.history]
    # A finished run resumed again trains nothing and reports the same result.
    again = train(cfg, out=tmp_path, resume=True)
    assert again.final == full.final and again.seconds == resumed.seconds


def test_checkpoint_written_atomically_and_config_saved(tmp_path):
    cfg = tiny()
    train(cfg, out=tmp_path)
    ck = checkpoint_path(cfg, tmp_path)
    state = load_checkpoint(ck)
    assert state["config"] == cfg.to_json() and state["passes_done"] == 3
    prev = ck.with_name(ck.stem + ".prev.pt")  # the checkpoint before the newest is kept
    assert sorted(p.name for p in ck.parent.iterdir()) == sorted([ck.name, prev.name])  # no temporary files
    assert load_checkpoint(prev)["passes_done"] == 2


def test_corrupt_checkpoint_is_refused_and_kept(tmp_path):
    cfg = tiny()
    with pytest.raises(Stop):
        train(cfg, out=tmp_path, progress=_stopper(1))
    ck = checkpoint_path(cfg, tmp_path)
    raw = bytearray(ck.read_bytes())
    raw[-10] ^= 0xFF
    ck.write_bytes(bytes(raw))
    with pytest.raises(UserError) as e:
        train(cfg, out=tmp_path, resume=True)
    # tmp_path is named after this test and holds the word "corrupt" itself
    assert "is corrupt (checksum mismatch)" in strip_paths(str(e.value), tmp_path), str(e.value)
    assert ck.read_bytes() == bytes(raw)  # nothing overwritten


def test_checkpoint_refuses_pickled_objects(tmp_path):
    import hashlib
    import io
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    body = buf.getvalue()
    p = tmp_path / "evil.pt"
    p.write_bytes(MAGIC + hashlib.sha256(body).digest() + body)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(p)
    save_checkpoint(tmp_path / "ok.pt", {"a": np.arange(3, dtype=np.float32), "n": 4, "s": "x"})
    back = load_checkpoint(tmp_path / "ok.pt")
    assert back["n"] == 4 and back["a"].tolist() == [0.0, 1.0, 2.0]


def test_resume_with_other_config_is_refused(tmp_path):
    cfg = tiny()
    with pytest.raises(Stop):
        train(cfg, out=tmp_path, progress=_stopper(1))
    ck = checkpoint_path(cfg, tmp_path)
    other = tiny(**{"optim.lr": 0.01})
    other.name = cfg.name
    # A different config has a different checkpoint file; copying one over is caught.
    checkpoint_path(other, tmp_path).write_bytes(ck.read_bytes())
    with pytest.raises(UserError, match="different config"):
        train(other, out=tmp_path, resume=True)


def test_divergence_is_reported_not_raised():
    cfg = tiny(**{"optim.lr": 50.0, "model.out_act": "none", "model.act": "relu"})
    res = train(cfg)
    assert res.status == "diverged" and "diverged in pass" in res.message


def test_store_records_and_lists(tmp_path):
    cfg = tiny()
    res = train(cfg)
    rid = add_run(tmp_path, "repro", cfg.name, res.status, res.config, res.summary(), res.history, {"torch": "x"})
    runs = list_runs(tmp_path)
    assert runs[-1]["id"] == rid and runs[-1]["summary"]["test_misses"] == res.final[0]["test_misses"]
    assert runs[-1]["config"]["data"]["n_train"] == 150 and len(runs[-1]["history"]) == 3


def test_store_concurrent_writers(tmp_path):
    code = ("import sys; sys.path.insert(0, %r); from backproplab.store import add_run\n"
            "for i in range(25): add_run(%r, 'repro', 'w', 'finished', {}, {'i': i}, [], {})") % (
        str(ROOT / "src"), str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert len(list_runs(tmp_path)) == 100
