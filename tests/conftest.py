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
