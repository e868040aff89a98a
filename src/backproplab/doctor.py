"""`backproplab doctor`: check the environment, the data and an output folder, in plain words."""
import hashlib
import os
import sqlite3
from pathlib import Path


def _check(name, fn):
    try:
        ok, detail = fn()
    except Exception as e:  # noqa: BLE001 - a check that crashes is a failed check, reported in words
        ok, detail = False, f"{type(e).__name__}: {e}"
    return {"check": name, "ok": bool(ok), "detail": detail}


def _torch():
    import torch
    v = torch.__version__
    return True, f"torch {v}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, " \
                 f"CUDA {'available' if torch.cuda.is_available() else 'not available (CPU only)'}"


def _numba():
    import numba
    return True, f"numba {numba.__version__} (the fast engine)"


def _embedded():
    from .data.sources import EMBEDDED_SHA256, load_mnist10k
    x, y = load_mnist10k()
    h = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    return h == EMBEDDED_SHA256, "embedded 10,000 digits intact" if h == EMBEDDED_SHA256 else \
        f"embedded digits changed (sha256 {h[:12]}...); reinstall backproplab"


def _store(out: Path):
    db = out / "runs.db"
    if not db.exists():
        return True, f"no results store in {out} yet"
    con = sqlite3.connect(str(db), timeout=10)
    try:
        res = con.execute("PRAGMA integrity_check").fetchone()[0]
        n = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    finally:
        con.close()
    return res == "ok", f"results store {db}: {n} runs, integrity {res}"


def _checkpoints(out: Path):
    from .engine.checkpoint import load_checkpoint
    folder = out / "checkpoints"
    files = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    bad = []
    for f in files:
        try:
            load_checkpoint(f)
        except Exception as e:  # noqa: BLE001
            bad.append(f"{f.name} ({e})")
    if bad:
        return False, f"{len(bad)} of {len(files)} checkpoints unreadable: " + "; ".join(bad)
    return True, f"{len(files)} checkpoints verified (checksums and safe loading)"


def _writable(out: Path):
    if out.exists() and not out.is_dir():
        return False, f"{out} is a file, not a folder"
    probe = out if out.exists() else out.parent
    return os.access(probe, os.W_OK), f"{out} {'is' if os.access(probe, os.W_OK) else 'is NOT'} writable"


def run_doctor(out) -> list[dict]:
    out = Path(out)
    return [_check("torch", _torch), _check("numba", _numba), _check("embedded data", _embedded),
            _check("output folder", lambda: _writable(out)), _check("results store", lambda: _store(out)),
            _check("checkpoints", lambda: _checkpoints(out))]
