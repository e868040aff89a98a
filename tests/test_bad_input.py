"""Bad input: one table of malformed configs, arguments, data files, output folders, stores
and checkpoints, each through the real CLI entry (backproplab.cli.main in this process, a
few as `python -m backproplab` subprocesses). Every case must end with exit code 2, exactly
one line on stderr that starts with "error:" and names the problem, no traceback, and
every file already in the output folder (a results store and the checkpoints of a finished
run) byte-identical, with nothing added.
"""
import errno
import gzip
import hashlib
import io
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from backproplab.cli import main
from backproplab.config import apply_overrides, preset
from backproplab.data import write_idx
from backproplab.engine import checkpoint as ckmod
from backproplab.engine.train import checkpoint_path
from _helpers import strip_paths
from conftest import ROOT

GOLD = ["--preset", "smoke", "--engine", "fast", "data.n_train=60", "data.n_test=40", "train.passes=2"]
FRESH = GOLD + ["train.seed=5"]           # a config with no checkpoint yet: it would train
ALL_DATA = ["data.n_train=none", "data.n_test=none"]
R = ["repro", "--out", "{out}"]


def _gold_cfg():
    return apply_overrides(preset("smoke"), ["train.engine=fast", "data.n_train=60", "data.n_test=40",
                                             "train.passes=2"])


@pytest.fixture(scope="module")
def gold(tmp_path_factory):
    """A finished run: runs.db and checkpoints/<name>.pt and .prev.pt."""
    out = tmp_path_factory.mktemp("gold")
    assert main(["repro", *GOLD, "--out", str(out), "--quiet"]) == 0
    assert len(list((out / "checkpoints").iterdir())) == 2
    return out


# ---- setups: each gets a namespace with out, idx, tmp, ck (the finished run's checkpoint) -----
def _rewrite(name, fn):
    def setup(c):
        p = c.idx / name
        p.write_bytes(fn(p.read_bytes()))
    return setup


def _idx_array(name, arr):
    return lambda c: write_idx(c.idx / name, arr)


def _both_checkpoints(fn):
    def setup(c):
        for p in (c.ck, ckmod.prev_path(c.ck)):
            p.write_bytes(fn(p.read_bytes()))
    return setup


def _sealed(payload) -> bytes:
    """Checkpoint bytes with a valid header and checksum around any torch.save payload."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    return ckmod.MAGIC + hashlib.sha256(buf.getvalue()).digest() + buf.getvalue()


def _forged_state(edit):
    """Both checkpoints of the finished run, edited, with valid checksums."""
    def setup(c):
        for p in (c.ck, ckmod.prev_path(c.ck)):
            state = ckmod.read_checkpoint(p)
            edit(state)
            p.write_bytes(_sealed(state))
    return setup


def _other_model(state):  # what a micro-ViT run's checkpoint copied over this one says
    cfg = json.loads(state["config"])
    cfg["model"]["name"], cfg["train"]["engine"] = "vit", "minibatch"
    state["config"] = json.dumps(cfg, sort_keys=True)


def _two_replicas(state):
    state["engine"]["replicas"] = torch.tensor(2)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _evil(raw):
    return _sealed({"config": "x", "payload": Evil()})


def _foreign_db(path):
    path.unlink(missing_ok=True)
    con = sqlite3.connect(str(path))
    con.executescript("CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('ann');")
    con.commit()
    con.close()


def _gz_damaged(c):
    p = c.idx / "train-images-idx3-ubyte"
    z = bytearray(gzip.compress(p.read_bytes()))
    z[len(z) // 2] ^= 0xFF
    p.unlink()
    (c.idx / "train-images-idx3-ubyte.gz").write_bytes(bytes(z))


def _no_test_images(c):
    _idx_array("t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))(c)
    _idx_array("t10k-labels-idx1-ubyte", np.zeros(0, np.uint8))(c)


def _mkdir(name):
    return lambda c: (c.tmp / name).mkdir()


def _afile(c):
    (c.tmp / "afile").write_text("keep me")


D = R + ["--data", "{idx}", *GOLD, *ALL_DATA]  # repro on the IDX folder
CASES = [  # (id, argv, words in the error line, setup, how: "in" (main()) or "sub" (a subprocess))
    # configs
    ("unknown-key", R + GOLD + ["optim.lrr=0.1"], ["optim.lrr"], None, "in"),
    ("unknown-section", R + GOLD + ["optimizer.lr=0.1"], ["optimizer"], None, "in"),
    ("key-without-section", R + GOLD + ["lr=0.1"], ["'lr'"], None, "in"),
    ("not-key-value", R + GOLD + ["optim.lr"], ["not key=value"], None, "in"),
    ("float-expected", R + GOLD + ["optim.lr=fast"], ["optim.lr", "float"], None, "in"),
    ("int-expected", R + GOLD + ["train.passes=2.5"], ["train.passes", "int"], None, "in"),
    ("empty-value", R + GOLD + ["optim.lr="], ["optim.lr"], None, "in"),
    ("nan", R + GOLD + ["optim.lr=nan"], ["optim.lr"], None, "in"),
    ("inf", R + GOLD + ["optim.lr=inf"], ["optim.lr"], None, "in"),
    ("lr-zero", R + GOLD + ["optim.lr=0"], ["optim.lr", "> 0"], None, "in"),
    ("lr-negative", R + GOLD + ["optim.lr=-0.5"], ["optim.lr"], None, "in"),
    ("lr-huge", R + GOLD + ["optim.lr=1e9"], ["optim.lr", "<= 100"], None, "in"),
    ("passes-zero", R + ["--passes", "0"], ["train.passes"], None, "in"),
    ("passes-negative", R + GOLD + ["train.passes=-3"], ["train.passes"], None, "in"),
    ("passes-huge", R + GOLD + ["train.passes=100000000"], ["train.passes"], None, "in"),
    ("passes-none", R + GOLD + ["train.passes=none"], ["train.passes"], None, "in"),
    ("seeds-zero", R + GOLD + ["--seeds", "0"], ["train.seeds"], None, "in"),
    ("seeds-huge", R + GOLD + ["train.seeds=1000000"], ["train.seeds"], None, "in"),
    ("n-train-zero", R + GOLD + ["data.n_train=0"], ["data.n_train"], None, "in"),
    ("n-train-beyond-data", R + GOLD + ["data.n_train=9000"], ["n_train=9000", "7291"], None, "in"),
    ("n-test-huge", R + GOLD + ["data.n_test=99999999999"], ["data.n_test"], None, "in"),
    ("dropout-one", R + GOLD + ["model.dropout=1.0"], ["model.dropout", "< 1"], None, "in"),
    ("shift-range", R + GOLD + ["train.shift=9"], ["train.shift"], None, "in"),
    ("beta-range", R + GOLD + ["optim.beta1=1.5"], ["optim.beta1"], None, "in"),
    ("threads-zero", R + GOLD + ["train.threads=0"], ["train.threads"], None, "in"),
    ("bad-choice", R + GOLD + ["model.act=sigmoid"], ["model.act", "choose one of"], None, "in"),
    ("engine-unknown", R + GOLD + ["--engine", "turbo"], ["train.engine"], None, "in"),
    ("batch-per-example", R + GOLD + ["train.batch=8"], ["train.batch=8", "engine=population"], None, "in"),
    ("vit-per-example", R + GOLD + ["model.name=vit"], ["model.name=vit", "engine=population"], None, "in"),
    ("ce-with-tanh", R + GOLD + ["train.loss=ce"], ["model.out_act=none"], None, "in"),
    ("sdlm-vit", R + GOLD + ["train.engine=population", "model.name=vit", "optim.name=sdlm"],
     ["optim.name=sdlm", "needs model.name=net1989, not vit"], None, "in"),
    ("cuda-fast", R + GOLD + ["--device", "cuda"], ["CPU"], None, "in"),
    ("unknown-preset", R + ["--preset", "nope"], ["nope"], None, "in"),
    # command-line arguments
    ("unknown-command", ["frobnicate", "--out", "{out}"], ["frobnicate"], None, "in"),
    ("no-command", [], ["choose a command"], None, "in"),
    ("seeds-not-int", R + ["--seeds", "two"], ["--seeds"], None, "in"),
    ("unknown-flag", R + ["--bogus"], ["--bogus"], None, "in"),
    ("flag-without-value", ["repro", "--out"], ["--out", "expected one argument"], None, "in"),
    ("ladder-unknown-rung", ["ladder", "--rungs", "1,9", "--out", "{out}"], ["unknown rung 9"], None, "in"),
    ("ladder-seeds-zero", ["ladder", "--seeds", "0", "--out", "{out}"], ["--seeds"], None, "in"),
    ("ladder-jobs-zero", ["ladder", "--jobs", "0", "--out", "{out}"], ["--jobs"], None, "in"),
    ("ladder-engine", ["ladder", "--engine", "turbo", "--out", "{out}"], ["--engine", "turbo"], None, "in"),
    # the one engine: a method the model cannot take names both, a sweep with no values, a refusing preset
    ("method-on-vit", ["train", "rung6", "+method=batchnorm", "--out", "{out}"], ["batchnorm", "vit"], None, "in"),
    ("scale-lrs-empty", ["scale", "run", "--smoke", "--lrs", ",", "--out", "{out}"], ["--lrs"], None, "in"),
    ("scale-method-refused", ["scale", "run", "--smoke", "+method=swa", "--out", "{out}"], ["swa", "scaling cell"],
     None, "in"),
    ("effects-eval-every", ["effects", "--smoke", "--eval-every", "0", "--out", "{out}"], ["--eval-every"], None, "in"),
    ("datascale-sizes-text", ["datascale", "--sizes", "1k", "--out", "{out}"], ["--sizes", "integers"], None, "in"),
    ("datascale-sizes-huge", ["datascale", "--sizes", "99999", "--out", "{out}"], ["99999", "7291"], None, "in"),
    ("datascale-recipe", ["datascale", "--recipes", "future", "--out", "{out}"], ["future"], None, "in"),
    ("datascale-n-test", ["datascale", "--n-test", "999999", "--out", "{out}"], ["--n-test"], None, "in"),
    ("datascale-passes-zero", ["datascale", "--passes", "0", "--out", "{out}"], ["--passes"], None, "in"),
    # data files
    ("data-missing", R + GOLD + ["--data", "{tmp}/nope"], ["nope", "no such file or folder"], None, "in"),
    ("data-is-a-file", R + GOLD + ["--data", "{tmp}/afile"], ["not a folder"], _afile, "in"),
    ("data-empty-folder", R + GOLD + ["--data", "{tmp}/void"], ["no train-images"], _mkdir("void"), "in"),
    ("data-missing-labels", D, ["no t10k-labels"], lambda c: (c.idx / "t10k-labels-idx1-ubyte").unlink(), "in"),
    ("data-truncated", D, ["truncated"], _rewrite("train-images-idx3-ubyte", lambda b: b[:-100]), "in"),
    ("data-truncated-header", D, ["truncated IDX header"], _rewrite("train-images-idx3-ubyte", lambda b: b[:6]),
     "in"),
    ("data-empty-file", D, ["magic"], _rewrite("train-labels-idx1-ubyte", lambda b: b""), "in"),
    ("data-wrong-magic", D, ["magic"], _rewrite("t10k-labels-idx1-ubyte", lambda b: b"\x07\x07" + b[2:]), "in"),
    ("data-type-code", D, ["type code 0x0d"], _rewrite("t10k-images-idx3-ubyte", lambda b: b[:2] + b"\x0d" + b[3:]),
     "in"),
    ("data-padded", D, ["padded"], _rewrite("t10k-images-idx3-ubyte", lambda b: b + b"\0" * 9), "in"),
    ("data-two-dims", D, ["2 dimensions"], _idx_array("train-images-idx3-ubyte", np.zeros((30, 784), np.uint8)),
     "in"),
    ("data-image-size", D, ["20x20", "28x28"], _idx_array("train-images-idx3-ubyte", np.zeros((30, 20, 20), np.uint8)),
     "in"),
    ("data-label-count", D, ["30 train images but 29 labels"],
     _idx_array("train-labels-idx1-ubyte", np.zeros(29, np.uint8)), "in"),
    ("data-label-range", D, ["label 12", "0-9"], _idx_array("t10k-labels-idx1-ubyte", np.full(12, 12, np.uint8)),
     "in"),
    ("data-empty-set", D, ["empty"], _no_test_images, "in"),
    ("data-damaged-gzip", D, ["corrupt gzip"], _gz_damaged, "in"),
    ("data-fewer-than-asked", R + ["--data", "{idx}", *GOLD, "data.n_test=none"], ["n_train=60", "30"], None, "in"),
    # output folders, stores and checkpoints
    ("out-is-a-file", ["repro", *GOLD, "--out", "{tmp}/afile"], ["is a file"], _afile, "in"),
    ("full-disk", R + FRESH, ["No space left on device"], None, "enospc"),
    ("file-size-limit", R + FRESH, ["File too large"], None, "fsize"),
    ("read-only-folder", R + FRESH, ["not writable"], None, "readonly"),
    ("checkpoint-other-model", R + GOLD + ["--resume"], ["different config", "model.name: 'vit' in the checkpoint"],
     _forged_state(_other_model), "in"),
    ("checkpoint-state-misfit", R + GOLD + ["--resume"], ["does not fit this model", "2 replicas"],
     _forged_state(_two_replicas), "in"),
    ("checkpoint-corrupt", R + GOLD + ["--resume"], ["corrupt", "unusable too"],
     _both_checkpoints(lambda b: b[:-50] + bytes(50)), "in"),
    ("checkpoint-truncated", R + GOLD + ["--resume"], ["unusable too"], _both_checkpoints(lambda b: b[:30]), "sub"),
    ("checkpoint-pickled-object", R + GOLD + ["--resume"], ["refused"], _both_checkpoints(_evil), "in"),
    ("checkpoint-not-one", R + GOLD + ["--resume"], ["bad header"], _both_checkpoints(lambda b: b"PK\x03\x04" * 20),
     "in"),
    ("runs-foreign-file", ["runs", "--out", "{tmp}/other.db"], ["not a backproplab results store"],
     lambda c: _foreign_db(c.tmp / "other.db"), "in"),
    ("runs-foreign-in-folder", ["runs", "--out", "{out}"], ["no runs table"], lambda c: _foreign_db(c.out / "runs.db"),
     "sub"),
    ("repro-foreign-store", R + FRESH, ["not a backproplab results store"], lambda c: _foreign_db(c.out / "runs.db"),
     "in"),
    ("ladder-foreign-store", ["ladder", "--smoke", "--rungs", "1", "--out", "{out}"], ["no runs table"],
     lambda c: _foreign_db(c.out / "runs.db"), "in"),
    ("runs-not-sqlite", ["runs", "--out", "{out}"], ["not a usable results store"],
     lambda c: (c.out / "runs.db").write_bytes(b"not a database " * 300), "in"),
    ("runs-empty-folder", ["runs", "--out", "{tmp}/void"], ["no results store"], _mkdir("void"), "in"),
    ("subprocess-unknown-key", R + GOLD + ["optim.lrr=0.1"], ["optim.lrr"], None, "sub"),
    ("subprocess-truncated-data", D, ["truncated"], _rewrite("train-images-idx3-ubyte", lambda b: b[:-1]), "sub"),
]


# ---- running a case --------------------------------------------------------------------
def _snapshot(folder: Path) -> dict:
    if folder.is_file():
        return {".": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _subprocess(argv, preexec=None, wrap=()):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([*wrap, sys.executable, "-m", "backproplab", *argv], capture_output=True, text=True,
                       env=env, timeout=300, preexec_fn=preexec)
    return r.returncode, r.stderr


def _limit_file_size():
    # 36 kB: the store's 32 kB shared-memory index fits, a 40 kB checkpoint does not (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (36_000, 36_000))


def _read_only(out: Path, argv, capsys, monkeypatch):
    """A folder no write can go to: permission bits for a normal user; for root (whom permission
    bits do not stop) a read-only bind mount in a private mount namespace; where neither is
    possible, the probe write failing as on a read-only mount."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in (out, out / "checkpoints")}
        for p in modes:
            p.chmod(0o555)
        try:
            return _subprocess(argv)
        finally:
            for p, m in modes.items():
                p.chmod(m)
    if shutil.which("unshare") and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0:
        return _subprocess(argv, wrap=("unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"',
                                       str(out)))

    def mkstemp(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr("backproplab.engine.train.tempfile.mkstemp", mkstemp)
    return main(argv), capsys.readouterr().err


def _full_disk(monkeypatch):
    """Every write of a checkpoint fails as on a full disk (the probe, an empty file, succeeds)."""
    def write(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    fake = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    fake.write = write
    monkeypatch.setattr(ckmod, "os", fake)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, gold, tmp_path, capsys, monkeypatch):
    name, argv, words, setup, how = case
    c = types.SimpleNamespace(out=tmp_path / "out", idx=tmp_path / "idx", tmp=tmp_path)
    shutil.copytree(gold, c.out)
    c.ck = checkpoint_path(_gold_cfg(), c.out)
    c.idx.mkdir()
    rng = np.random.default_rng(0)
    for fname, arr in (("train-images-idx3-ubyte", rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)),
                       ("train-labels-idx1-ubyte", rng.integers(0, 10, 30, dtype=np.uint8)),
                       ("t10k-images-idx3-ubyte", rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)),
                       ("t10k-labels-idx1-ubyte", rng.integers(0, 10, 12, dtype=np.uint8))):
        write_idx(c.idx / fname, arr)
    if setup:
        setup(c)
    argv = [a.format(out=c.out, idx=c.idx, tmp=tmp_path) for a in argv]
    watched = {p: _snapshot(p) for p in (c.out, tmp_path / "afile", tmp_path / "other.db") if p.exists()}
    capsys.readouterr()
    if how == "in":
        code, err = main(argv), capsys.readouterr().err
    elif how == "sub":
        code, err = _subprocess(argv)
    elif how == "fsize":
        code, err = _subprocess(argv, preexec=_limit_file_size)
    elif how == "enospc":
        _full_disk(monkeypatch)
        code, err = main(argv), capsys.readouterr().err
    else:
        code, err = _read_only(c.out, argv, capsys, monkeypatch)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (code, err)
    assert "Traceback" not in err
    # test ids such as data-truncated are in tmp_path's name: words count only outside the paths
    said = strip_paths(lines[0], tmp_path)
    for w in words:
        assert w in said, (w, said)
    for p, before in watched.items():
        assert _snapshot(p) == before, f"{name}: {p} changed"
