"""IDX files (MNIST and Fashion-MNIST share the format), raw or gzipped.

Format: 2 zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
big-endian uint32 per dimension, then the data. Every read is validated: magic,
type, dimensions and length; an invalid file raises UserError naming the file.
"""
import gzip
import hashlib
import math
import os
import struct
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from ..errors import UserError

_UINT8 = 0x08


def _open_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # zlib.error: a damaged deflate stream
            raise UserError(f"{path}: corrupt gzip data ({e})") from None
    return raw


def read_idx(path) -> np.ndarray:
    path = Path(path)
    raw = _open_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != _UINT8:
        raise UserError(f"{path}: IDX type code 0x{raw[2]:02x} is not uint8 (0x08)")
    ndim = raw[3]
    if ndim not in (1, 3):
        raise UserError(f"{path}: IDX file has {ndim} dimensions; expected 1 (labels) or 3 (images)")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise UserError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:head])
    n = math.prod(dims)  # Python ints: a forged header cannot overflow into a plausible size
    if len(raw) - head != n:
        raise UserError(f"{path}: truncated or padded IDX file: header says {n} bytes of data, "
                        f"found {len(raw) - head}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims).copy()


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    a = np.ascontiguousarray(array, dtype=np.uint8)
    blob = bytes([0, 0, _UINT8, a.ndim]) + struct.pack(">" + "I" * a.ndim, *a.shape) + a.tobytes()
    Path(path).write_bytes(gzip.compress(blob) if compress else blob)


# Standard file names; each may be gzipped ('.gz') or raw.
_STEMS = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find(folder: Path, key: str) -> Path:
    for stem in _STEMS[key]:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise UserError(f"{folder}: no {_STEMS[key][0]}[.gz] file (is this a folder of IDX files?)")


def load_idx_folder(folder):
    """-> (train_x, train_y, test_x, test_y), images uint8 (N, 28, 28), labels uint8 (N,)."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"data folder {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"data path {folder} is not a folder of IDX files")
    out = []
    for split in ("train", "test"):
        x = read_idx(_find(folder, f"{split}_images"))
        y = read_idx(_find(folder, f"{split}_labels"))
        if x.ndim != 3 or y.ndim != 1:
            raise UserError(f"{folder}: {split} images must be 3-D and labels 1-D")
        if x.shape[1:] != (28, 28):  # the 1989 preprocessing resizes 28x28 digits to 16x16
            raise UserError(f"{folder}: {split} images are {x.shape[1]}x{x.shape[2]} pixels; expected 28x28")
        if len(x) != len(y):
            raise UserError(f"{folder}: {len(x)} {split} images but {len(y)} labels")
        if y.size and y.max() > 9:
            raise UserError(f"{folder}: {split} label {int(y.max())} is outside 0-9")
        out += [x, y]
    return tuple(out)


# Known downloads: (url, sha256 of the gzipped file). MNIST from the Google mirror that
# torchvision uses; Fashion-MNIST from Zalando's bucket.
DOWNLOADS = {
    "mnist": {
        "base": "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "files": {
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
    },
    "fashion-mnist": {
        "base": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "files": {
            "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
    },
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(name: str, folder, opener=urllib.request.urlopen) -> Path:
    """Fetch a known dataset into folder, verifying SHA-256 before a file is kept."""
    if name not in DOWNLOADS:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(DOWNLOADS)}")
    spec = DOWNLOADS[name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for fname, digest in spec["files"].items():
        dest = folder / fname
        if dest.is_file() and sha256_file(dest) == digest:
            continue
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{fname}.")
        try:
            try:
                with opener(spec["base"] + fname) as resp, os.fdopen(fd, "wb") as out:
                    for block in iter(lambda: resp.read(1 << 20), b""):
                        out.write(block)
            except OSError as e:
                raise UserError(f"download of {fname} failed: {e}") from None
            got = sha256_file(Path(tmp))
            if got != digest:
                raise UserError(f"{fname}: SHA-256 mismatch (got {got[:16]}..., expected {digest[:16]}...)")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return folder
