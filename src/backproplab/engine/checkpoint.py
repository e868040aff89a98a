"""Checkpoints: atomic writes, a content checksum, the previous good file kept, safe loading.

File layout: MAGIC (8 bytes) + sha256 of the payload (32 bytes) + payload, where the
payload is torch.save of plain containers of tensors, numbers and strings. Loading
verifies the checksum and then uses torch.load(weights_only=True), which refuses
arbitrary pickled objects.

Writing `x.pt` (see atomic_write_bytes): the new bytes go to a temporary file that is
flushed and fsynced; the current `x.pt` is hard-linked to `x.prev.pt` (itself through a
temporary name and a rename); then the temporary file is renamed over `x.pt` and the
folder fsynced. At every instant `x.pt` is either the old or the new complete file, and
`x.prev.pt` the one before, so a process killed anywhere leaves a loadable checkpoint.
If the newest file is damaged anyway (a disk or a copy going wrong), load_checkpoint
falls back to `x.prev.pt` and says so in one line.
"""
import hashlib
import io
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

MAGIC = b"BPLCKPT1"
HEADER = len(MAGIC) + 32  # magic + sha256


def _to_tensors(obj):
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj, copy=True))  # keeps 0-d arrays 0-d
    if isinstance(obj, dict):
        return {k: _to_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_tensors(v) for v in obj]
    return obj


def prev_path(path) -> Path:
    """x.pt -> x.prev.pt: the checkpoint before the newest."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def has_checkpoint(path) -> bool:
    return Path(path).exists() or prev_path(path).exists()


def remove_checkpoint(path) -> None:
    """Delete a checkpoint for good: the newest file, the previous one, temporary files."""
    path = Path(path)
    for f in (path, prev_path(path), *path.parent.glob(f".{path.stem}*.tmp.*")):
        f.unlink(missing_ok=True)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def _write_fsync(path: Path, data: bytes) -> None:
    # os-level writes in a loop: a short write (a signal, a nearly full disk) is continued, not lost
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while len(view):
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename already happened


def _remove_stale_tmp(path: Path) -> None:
    """Temporary files of writers that were killed (their pid is gone) are garbage."""
    for f in path.parent.glob(f".{path.stem}*.tmp.*"):
        try:
            pid = int(f.name.rsplit(".", 1)[1])
            if pid != os.getpid():
                os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            continue


def _keep_previous(path: Path) -> None:
    """Make x.prev.pt the current x.pt without ever leaving x.pt missing."""
    prev = prev_path(path)
    tmp = _tmp_name(prev)
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # no hard links on this file system: copy the bytes
        _write_fsync(tmp, path.read_bytes())
    os.replace(tmp, prev)


def atomic_write_bytes(path: Path, data: bytes, keep_previous: bool = False) -> None:
    """Temporary file, write, fsync, (keep the previous file), rename over the target, fsync the folder."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        _write_fsync(tmp, data)
        if keep_previous and path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
    except OSError as e:
        for t in (tmp, _tmp_name(prev_path(path))):
            try:
                t.unlink(missing_ok=True)
            except OSError:
                pass
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    _fsync_dir(path.parent)


def save_checkpoint(path, payload: dict) -> None:
    path = Path(path)
    buf = io.BytesIO()
    torch.save(_to_tensors(payload), buf)
    body = buf.getvalue()
    _remove_stale_tmp(path)
    atomic_write_bytes(path, MAGIC + hashlib.sha256(body).digest() + body, keep_previous=True)


def read_checkpoint(path) -> dict:
    """One file, strictly: a missing, damaged or unsafe file is a UserError naming it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if raw[:len(MAGIC)] != MAGIC or len(raw) < HEADER:
        raise UserError(f"checkpoint {path} is not a backproplab checkpoint (bad header)")
    body = raw[HEADER:]
    if hashlib.sha256(body).digest() != raw[len(MAGIC):HEADER]:
        raise UserError(f"checkpoint {path} is corrupt (checksum mismatch)")
    try:
        state = torch.load(io.BytesIO(body), weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"checkpoint {path} refused: it holds objects other than tensors, numbers and "
                        f"strings, which safe loading (weights_only) does not run") from None
    except (RuntimeError, ValueError, EOFError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} refused: {first}") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} refused: it holds a {type(state).__name__}, not a mapping")
    return state


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_checkpoint(path, fallback: bool = True, warn=_stderr_line) -> dict:
    """The newest checkpoint, or with fallback the previous one when the newest is unusable
    (warn gets one line saying so). Both unusable: the newest file's error."""
    path = Path(path)
    try:
        return read_checkpoint(path)
    except UserError as newest:
        prev = prev_path(path)
        if not fallback or not prev.exists():
            raise
        try:
            state = read_checkpoint(prev)
        except UserError:
            raise UserError(f"{newest}; the previous checkpoint {prev.name} is unusable too") from None
        if warn:
            warn(f"warning: {newest}; using the previous checkpoint {prev.name} "
                 f"(after pass {state.get('passes_done', '?')})")
        return state


def config_differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """['optim.lr: 0.03 in the checkpoint, 0.01 now', ...] for two config dicts."""
    out = []
    for k in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} in the checkpoint, {b!r} now")
    return out


def check_config(path, saved_json, cfg_json: str) -> None:
    """Refuse a checkpoint made with another config, naming what differs."""
    if saved_json == cfg_json:
        return
    try:
        diff = config_differences(json.loads(saved_json), json.loads(cfg_json))
    except (TypeError, ValueError, AttributeError):
        diff = ["its config is unreadable"]
    shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
    raise UserError(f"checkpoint {path} was made with a different config ({shown or 'key order'})")


def to_numpy_state(d: dict) -> dict:
    return {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in d.items()}
