import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from backproplab.data import write_idx
from _helpers import strip_paths
from conftest import ROOT, run_cli

TINY = ["--preset", "smoke", "--engine", "eager", "data.n_train=120", "data.n_test=50"]


def _idx_folder(path, **bad):
    path.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
             "train-labels-idx1-ubyte": rng.integers(0, 10, 30, dtype=np.uint8),
             "t10k-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
             "t10k-labels-idx1-ubyte": rng.integers(0, 10, 12, dtype=np.uint8)}
    for name, arr in files.items():
        write_idx(path / name, arr)
    for name, mutate in bad.items():
        p = path / name.replace("_", "-")
        p.write_bytes(mutate(p.read_bytes()))
    return path


def _assert_one_line_error(r, *words, paths=()):
    """paths: folders the message may name; the words must be in the rest of it."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    said = strip_paths(lines[0], *paths)
    for w in words:
        assert w in said, (w, said)


def test_repro_json_contract(tmp_path):
    r = run_cli("repro", *TINY, "--seeds", "2", "--out", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("train_error", "test_error", "train_misses", "test_misses", "passes", "seconds", "engine",
                "seeds", "weights_sha256"):
        assert key in out, key
    assert out["seeds"] == 2 and out["passes"] == 2 and out["engine"] == "eager"
    assert len(out["weights_sha256"]) == 2 and len(out["per_seed"]) == 2
    assert out["test_misses"] == np.mean([p["test_misses"] for p in out["per_seed"]])
    assert all(isinstance(p["test_misses"], int) for p in out["per_seed"])
    assert abs(out["test_error"] - 100 * out["test_misses"] / 50) < 1e-9
    assert "pass   2/2" in r.stdout and "LeCun et al. 1989" in r.stdout
    runs = run_cli("runs", "--out", tmp_path, "--json")
    listed = json.loads(runs.stdout.strip().splitlines()[-1])["runs"]
    assert listed[-1]["summary"]["weights_sha256"] == out["weights_sha256"]


def test_bad_inputs_one_line_exit_2(tmp_path):
    cases = [
        (["repro", "--passes", "-1"], ["train.passes"]),
        (["repro", "--seeds", "0"], ["train.seeds"]),
        (["repro", "--data", "/no/such/dir"], ["/no/such/dir"]),
        (["repro", "optim.lrr=0.1"], ["optim.lrr"]),
        (["repro", "optim.lr=fast"], ["optim.lr", "float"]),
        (["repro", "--seeds", "two"], ["--seeds"]),
        (["repro", "--preset", "nope"], ["nope"]),
        (["repro", "--engine", "fast", "--device", "cuda"], ["CPU"]),
        (["frobnicate"], ["frobnicate"]),
        (["runs", "--out", tmp_path / "empty"], ["no results store"]),
    ]
    for args, words in cases:
        _assert_one_line_error(run_cli(*args), *words, paths=[tmp_path])


def test_bad_data_files(tmp_path):
    trunc = _idx_folder(tmp_path / "t", train_images_idx3_ubyte=lambda b: b[:-100])
    _assert_one_line_error(run_cli("repro", "--data", trunc), "truncated", paths=[tmp_path])
    magic = _idx_folder(tmp_path / "m", t10k_labels_idx1_ubyte=lambda b: b"\x07\x07" + b[2:])
    _assert_one_line_error(run_cli("repro", "--data", magic), "magic", paths=[tmp_path])
    afile = tmp_path / "afile"
    afile.write_text("x")
    _assert_one_line_error(run_cli("repro", "--data", afile), "not a folder", paths=[tmp_path])


def test_out_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("keep me")
    _assert_one_line_error(run_cli("repro", *TINY, "--out", f), "is a file", paths=[tmp_path])
    assert f.read_text() == "keep me"


def test_corrupt_checkpoint_on_resume(tmp_path):
    assert run_cli("repro", *TINY, "--out", tmp_path).returncode == 0
    store_before = (tmp_path / "runs.db").read_bytes()
    for ck in (tmp_path / "checkpoints").iterdir():  # the newest and the kept previous checkpoint
        ck.write_bytes(ck.read_bytes()[:-50])
    # the temporary folder's name holds the word "corrupt": the checksum's own words are matched
    _assert_one_line_error(run_cli("repro", *TINY, "--out", tmp_path, "--resume"), "is corrupt (checksum mismatch)",
                           "unusable too", paths=[tmp_path])
    assert (tmp_path / "runs.db").read_bytes() == store_before


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    args = ["repro", *TINY, "train.passes=4", "--json"]
    ref = run_cli(*args, "--out", tmp_path / "ref")
    ref_out = json.loads(ref.stdout.strip().splitlines()[-1])
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "backproplab", *args, "--out", str(tmp_path / "k")],
                         stdout=subprocess.PIPE, text=True, env=env)
    for line in p.stdout:
        if line.startswith("pass   2/4"):
            p.send_signal(signal.SIGKILL)
            break
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    r = run_cli(*args, "--out", tmp_path / "k", "--resume")
    assert r.returncode == 0 and "resumed" in r.stdout
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["weights_sha256"] == ref_out["weights_sha256"]
    assert out["test_misses"] == ref_out["test_misses"]
    # Resuming the finished run again trains nothing and keeps its one record.
    again = json.loads(run_cli(*args, "--out", tmp_path / "k", "--resume").stdout.strip().splitlines()[-1])
    assert again["run_id"] == out["run_id"] and again["weights_sha256"] == out["weights_sha256"]
    from backproplab.store import list_runs
    assert [r["id"] for r in list_runs(tmp_path / "k")] == [out["run_id"]]


def test_doctor_finds_a_corrupt_checkpoint(tmp_path):
    assert run_cli("repro", *TINY, "--out", tmp_path).returncode == 0
    ok = run_cli("doctor", "--out", tmp_path, "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout.strip().splitlines()[-1])["ok"] is True
    ck = next((tmp_path / "checkpoints").iterdir())
    ck.write_bytes(ck.read_bytes()[:-3])
    bad = run_cli("doctor", "--out", tmp_path, "--json")
    report = json.loads(bad.stdout.strip().splitlines()[-1])
    assert bad.returncode == 1 and not report["ok"]
    assert [c["check"] for c in report["checks"] if not c["ok"]] == ["checkpoints"]
