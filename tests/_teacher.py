"""A finished run folder to distill from, made once per test process: modern_smoke's net on the
first 64 digits, 2 seeds (an ensemble), 2 passes, recorded in the folder's store as `train` does."""
import atexit
import functools
import shutil
import tempfile

from backproplab.config import apply_overrides, preset
from backproplab.data import load_dataset
from backproplab.engine.train import train
from backproplab.store import add_run

TEACHER_OVER = ["data.n_train=64", "data.n_test=32", "train.passes=2", "train.batch=16", "model.dropout=0",
                "train.shift=0", "optim.lr_end=none", "optim.name=sgd", "optim.lr=0.05", "train.seeds=2"]


@functools.lru_cache(maxsize=None)
def teacher_dir() -> str:
    folder = tempfile.mkdtemp(prefix="bpl-teacher-")
    atexit.register(shutil.rmtree, folder, True)  # removed when the test process ends
    cfg = apply_overrides(preset("modern_smoke"), TEACHER_OVER)
    r = train(cfg, out=folder, data=load_dataset("mnist10k", 64, 32))
    add_run(folder, "train", cfg.name, r.status, r.config, r.summary(), r.history, {})
    return folder


@functools.lru_cache(maxsize=None)
def teacher_result():
    """The teacher run's Result (its per-seed weights), trained again the same way without a folder."""
    cfg = apply_overrides(preset("modern_smoke"), TEACHER_OVER)
    return train(cfg, data=load_dataset("mnist10k", 64, 32))
