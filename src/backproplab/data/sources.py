"""Where the digits come from: the embedded 10k (default) or a folder of IDX files."""
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .idx import load_idx_folder
from .preprocess import preprocess_1989

EMBEDDED = "mnist10k"
# sha256(images.tobytes() + labels.tobytes()) of the vendored array, as scripts/vendor_mnist10k.py prints it.
EMBEDDED_SHA256 = "bc6b63550c8a82f6ecccd9458252069fb030ee802997b8242e71d5146b0cbf0e"
N_TRAIN_1989, N_TEST_1989 = 7291, 2007


@dataclass
class Dataset:
    """Preprocessed tensors for one train/test split; x (N,1,r,r) (r = 16 unless load_dataset was given
    another resolution), y (N,10) +-1, labels (N,)."""
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    train_labels: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_labels: torch.Tensor
    val_x: torch.Tensor | None = None      # the validation split carved from the training set, if any
    val_y: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None

    def splits(self) -> tuple:
        return ("train", "val", "test") if self.val_x is not None else ("train", "test")

    def with_validation(self, n_val: int) -> "Dataset":
        """The last n_val training examples become the validation split; training keeps the rest.
        The test set is untouched."""
        if self.val_x is not None:
            raise UserError("the data already has a validation split")
        n = len(self.train_x)
        if not 0 < n_val < n:
            raise UserError(f"data.val={n_val} must leave training examples: the training set has {n}")
        k = n - n_val
        return Dataset(self.name, self.train_x[:k], self.train_y[:k], self.train_labels[:k], self.test_x,
                       self.test_y, self.test_labels, self.train_x[k:], self.train_y[k:], self.train_labels[k:])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.train_x, self.train_labels, self.test_x, self.test_labels):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


def load_mnist10k():
    """-> images uint8 (10000, 28, 28), labels uint8 (10000,) in file order (digit 0 first)."""
    try:
        with resources.files("backproplab.data").joinpath("mnist10k.npz").open("rb") as f:
            z = np.load(f)
            images, labels = z["images"], z["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"embedded digits are missing or corrupt ({e}); reinstall backproplab") from None
    if images.shape != (10000, 28, 28) or labels.shape != (10000,):
        raise UserError("embedded digits have the wrong shape; reinstall backproplab")
    return images, labels


def canonical_split():
    """-> (train_idx, test_idx): SPEC section 1's split of the embedded 10k pool."""
    rng = np.random.RandomState(1337)  # same stream as np.random.seed(1337); permutation
    rp = rng.permutation(10000)
    return rp[:N_TRAIN_1989], rp[N_TRAIN_1989:N_TRAIN_1989 + N_TEST_1989]


def _limit(x, y, n, what):
    if n is None:
        return x, y
    if n > len(x):
        raise UserError(f"{what}={n} is larger than the {len(x)} examples available")
    return x[:n], y[:n]


def load_dataset(source: str = EMBEDDED, n_train: int | None = None, n_test: int | None = None,
                 resolution: int = 16) -> Dataset:
    """source: 'mnist10k' (embedded, canonical split) or a path to a folder of IDX files.

    n_train / n_test keep the first n examples (of the canonical order) when given; resolution:
    the side the 28x28 sources are resized to by the 1989 preprocessing (data.resolution).
    """
    if source == EMBEDDED:
        images, labels = load_mnist10k()
        tr, te = canonical_split()
        trx, try_ = images[tr], labels[tr]
        tex, tey = images[te], labels[te]
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"--data {source}: no such file or folder (use 'mnist10k' or a folder of IDX files)")
        trx, try_, tex, tey = load_idx_folder(path)
    trx, try_ = _limit(trx, try_, n_train, "n_train")
    tex, tey = _limit(tex, tey, n_test, "n_test")
    if len(trx) == 0 or len(tex) == 0:
        raise UserError(f"{source}: empty training or test set")
    a = preprocess_1989(trx, try_, size=resolution)
    b = preprocess_1989(tex, tey, size=resolution)
    return Dataset(str(source), a[0], a[1], a[2], b[0], b[1], b[2])
