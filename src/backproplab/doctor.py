"""`backproplab doctor`: check the environment, the data and an output folder, in plain words.

Every check is read-only: the results store is opened read-only, checkpoints are read
and verified, the writability probe creates and removes one empty file.
"""
import hashlib
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

MIN_TORCH = (2, 4)       # what pyproject.toml requires (torch.func as the population engine uses it)
MIN_FREE_BYTES = 200e6   # a long run writes a checkpoint every pass; below this a disk fills mid-run


def _check(name, fn):
    try:
        ok, detail = fn()
    except Exception as e:  # noqa: BLE001 - a check that crashes is a failed check, reported in words
        ok, detail = False, f"the check itself failed: {type(e).__name__}: {e}"
    return {"check": name, "ok": bool(ok), "detail": detail}


def _torch():
    import torch
    v = torch.__version__
    major_minor = tuple(int(p) for p in v.split("+")[0].split(".")[:2])
    cuda = "available" if torch.cuda.is_available() else "not available (CPU only)"
    detail = f"torch {v}, CUDA {cuda}"
    if major_minor < MIN_TORCH:
        return False, f"{detail}; backproplab needs torch >= {'.'.join(map(str, MIN_TORCH))}"
    return True, detail


def _threads():
    import torch
    n, cpus = torch.get_num_threads(), os.cpu_count() or 1
    detail = f"{n} torch threads, {torch.get_num_interop_threads()} inter-op, {cpus} CPUs"
    numba_threads = os.environ.get("NUMBA_NUM_THREADS")
    if numba_threads:
        detail += f", NUMBA_NUM_THREADS={numba_threads}"
    if n > cpus:
        return False, f"{detail}: more threads than CPUs slows every run; set train.threads <= {cpus}"
    return True, detail + " (runs set train.threads, default 1)"


def _fast_engine():
    try:
        import numba
    except ImportError:
        return False, "numba is not installed, so the fast engine (the default) cannot run; " \
                      "pip install numba, or use --engine eager"
    from llvmlite import binding
    from .engine._simd import isa_of
    isa = isa_of(binding.get_host_cpu_features())
    if isa is None:
        return False, f"numba {numba.__version__}, but this CPU has neither AVX2 with FMA nor AVX-512: the " \
                      f"fast engine cannot run here; use --engine eager (same numbers, slower)"
    cache = Path(__file__).parent / "engine" / "__pycache__"
    cached = cache.is_dir() and any(cache.glob("_kernels_*.nbi"))
    note = "kernels compiled and cached" if cached else \
        "kernels not compiled yet: the first fast run compiles them once, later runs reuse them"
    sets = {"avx512": "AVX-512", "avx2": "AVX2 + FMA (no AVX-512: the kernels run on half-width vectors)"}
    return True, f"numba {numba.__version__}, {sets[isa]}: fast engine available; {note}"


def _embedded():
    from .data.sources import EMBEDDED_SHA256, load_mnist10k
    x, y = load_mnist10k()
    h = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    return h == EMBEDDED_SHA256, "embedded 10,000 digits intact" if h == EMBEDDED_SHA256 else \
        f"embedded digits changed (sha256 {h[:12]}...); reinstall backproplab"


def _data_folder(folder):
    from .data.idx import load_idx_folder
    from .errors import UserError
    try:
        trx, try_, tex, tey = load_idx_folder(folder)
    except UserError as e:
        return False, str(e)
    return True, f"{folder}: {len(trx):,} training and {len(tex):,} test images of 28x28, labels 0-9, files intact"


def _writable(out: Path):
    if out.exists() and not out.is_dir():
        return False, f"{out} is a file, not a folder; choose another --out"
    probe = out
    while not probe.exists():  # the folder a run would create first
        probe = probe.parent
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".doctor.")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return False, f"cannot write in {probe} ({e.strerror}): runs could not save checkpoints or results"
    free = shutil.disk_usage(probe).free
    if free < MIN_FREE_BYTES:
        return False, f"{out} is writable but only {free / 1e6:.0f} MB are free; a run may stop with a full disk"
    return True, f"{out} is writable, {free / 1e9:.1f} GB free"


def _store(out: Path):
    from .errors import UserError
    from .store import open_store_readonly, store_path
    db = store_path(out)
    if not db.exists():
        return True, f"no results store in {out} yet"
    try:
        con = open_store_readonly(db)  # read-only; refuses a foreign file
    except UserError as e:
        return False, str(e)
    try:
        res = con.execute("PRAGMA integrity_check").fetchone()[0]
        counts = dict(con.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
    except sqlite3.DatabaseError as e:
        return False, f"results store {db} is damaged: {e}"
    finally:
        con.close()
    total = sum(counts.values())
    by = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if res != "ok":
        return False, f"results store {db} is damaged (integrity check: {res}); copy out what `runs` still lists"
    return True, f"results store {db}: {total} run{'' if total == 1 else 's'} ({by or 'none'}), integrity ok"


def _store_url(url: str):
    """A results store on a server: reachable, ours, how many runs (one read-only query)."""
    from .errors import UserError
    from .store_pg import describe, normalize_url, status_counts
    try:
        counts = status_counts(normalize_url(url))
    except UserError as e:
        return False, str(e)
    where = describe(normalize_url(url))
    if counts is None:
        return True, f"results store at {where}: reachable, no runs recorded yet"
    total = sum(counts.values())
    by = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return True, f"results store at {where}: {total} run{'' if total == 1 else 's'} ({by or 'none'})"


def _checkpoints(out: Path):
    from .engine.checkpoint import prev_path, read_checkpoint
    from .errors import UserError
    folder = out / "checkpoints"
    if not folder.is_dir():
        return True, "no checkpoints yet"
    newest = sorted(f for f in folder.glob("*.pt") if not f.name.endswith(".prev.pt"))
    bad, notes, verified = [], [], 0
    for f in newest + sorted(folder.glob("*.prev.pt")):
        try:
            read_checkpoint(f)
            verified += 1
        except UserError as e:
            bad.append(f)
            notes.append(str(e))
    for f in bad:
        if f in newest and prev_path(f).exists() and prev_path(f) not in bad:
            notes.append(f"--resume of {f.name} will continue from {prev_path(f).name}")
    leftovers = [f for f in folder.iterdir() if ".tmp." in f.name]
    tail = f"; {len(leftovers)} temporary files of killed runs (removed by the next save)" if leftovers else ""
    if bad:
        return False, f"{len(bad)} of {verified + len(bad)} checkpoint files unusable: " + "; ".join(notes) + tail
    return True, f"{verified} checkpoint files verified (checksums and safe loading){tail}"


def run_doctor(out, data=None, store=None) -> list[dict]:
    """store: the results store when it is not out's runs.db (another folder, or a server URL)."""
    out = Path(out)
    from .store import is_url
    if is_url(store):
        store_check = _check("results store", lambda: _store_url(store))
    else:
        store_check = _check("results store", lambda: _store(Path(store) if store else out))
    checks = [_check("torch", _torch), _check("threads", _threads), _check("fast engine", _fast_engine),
              _check("embedded data", _embedded)]
    if data:
        checks.append(_check("data folder", lambda: _data_folder(data)))
    return checks + [_check("output folder", lambda: _writable(out)), store_check,
                     _check("checkpoints", lambda: _checkpoints(out))]
