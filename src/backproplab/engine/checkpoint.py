"""Checkpoints: atomic writes, a content checksum, safe loading.

File layout: MAGIC (8 bytes) + sha256 of the payload (32 bytes) + payload, where the
payload is torch.save of plain containers of tensors, numbers and strings. Loading
verifies the checksum and then uses torch.load(weights_only=True), which refuses
arbitrary pickled objects.
"""
import hashlib
import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

MAGIC = b"BPLCKPT1"


def _to_tensors(obj):
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj, copy=True))  # keeps 0-d arrays 0-d
    if isinstance(obj, dict):
        return {k: _to_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_tensors(v) for v in obj]
    return obj


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temporary file in the same folder, flush, fsync, rename over the target, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp.exists():
            tmp.unlink()
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename already happened


def save_checkpoint(path, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(_to_tensors(payload), buf)
    body = buf.getvalue()
    atomic_write_bytes(Path(path), MAGIC + hashlib.sha256(body).digest() + body)


def load_checkpoint(path) -> dict:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if raw[:8] != MAGIC or len(raw) < 40:
        raise UserError(f"checkpoint {path} is not a backproplab checkpoint (bad header)")
    body = raw[40:]
    if hashlib.sha256(body).digest() != raw[8:40]:
        raise UserError(f"checkpoint {path} is corrupt (checksum mismatch)")
    try:
        return torch.load(io.BytesIO(body), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} refused: {first}") from None


def to_numpy_state(d: dict) -> dict:
    return {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in d.items()}
