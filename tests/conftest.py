import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


@pytest.fixture(scope="session")
def digits():
    from backproplab.data import load_dataset
    return load_dataset()


def run_cli(*args, cwd=None, env=None, timeout=300):
    """Run `python -m backproplab ...` in a subprocess -> CompletedProcess."""
    import subprocess
    e = dict(os.environ, PYTHONPATH=str(ROOT / "src"), **(env or {}))
    return subprocess.run([sys.executable, "-m", "backproplab", *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


class Stop(Exception):
    """Raised by stop_in's progress callback: a run stopped at a chosen point, as a kill would."""


def stop_in(pass_idx):
    """A train() progress callback that raises Stop at pass `pass_idx`."""
    def progress(p, done, total):
        if p == pass_idx:  # the checkpoint of pass `pass_idx` is on disk by now
            raise Stop
    return progress


# Search trials long enough (about 1.5 s each here) to be caught between their first checkpoint and
# their end by a poller that shares 2 cores with 3 workers and another test (20 passes, about 0.7 s,
# were missed once in a full run of the suite)
MID_RUN_PASSES = 40


def kill_a_trial_mid_run(proc, trials, ready, timeout=240.0):
    """While command `proc` runs, poll trials() (the study's trials; may raise while the study is not
    there yet) for one RUNNING with a worker pid for which ready(trial) holds; SIGKILL that worker
    -> the trial, or None if none was caught before the command ended."""
    import signal
    import time
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
        try:
            found = trials()
        except Exception:  # noqa: BLE001 - the study is not written yet
            continue
        for t in found:
            if t.state.name == "RUNNING" and "pid" in t.user_attrs and ready(t):
                os.kill(t.user_attrs["pid"], signal.SIGKILL)
                time.sleep(0.2)
                return t
    return None


def checkpoint_in(folder):
    """-> the first checkpoint file in folder, or None (a trial's checkpoints/ folder)."""
    return next((p for p in folder.iterdir() if p.suffix == ".pt"), None) if folder.is_dir() else None
