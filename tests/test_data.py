import gzip
import hashlib
import io
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backproplab.data import canonical_split, load_dataset, load_mnist10k, read_idx, write_idx, load_idx_folder
from backproplab.data import idx as idxmod
from backproplab.errors import UserError


def test_embedded_digits_in_file_order():
    images, labels = load_mnist10k()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    assert np.all(np.diff(labels.astype(int)) >= 0)  # digit 0 first, then 1, ...


def test_canonical_split_pinned():
    images, labels = load_mnist10k()
    tr, te = canonical_split()
    assert len(tr) == 7291 and len(te) == 2007 and not set(tr) & set(te)
    np.random.seed(1337)
    rp = np.random.permutation(10000)  # the SPEC's own words, as an oracle
    assert np.array_equal(tr, rp[:7291]) and np.array_equal(te, rp[7291:9298])
    assert np.bincount(labels[tr]).tolist() == [710, 850, 702, 753, 720, 623, 747, 765, 702, 719]
    assert np.bincount(labels[te]).tolist() == [228, 202, 210, 204, 194, 166, 204, 235, 178, 186]
    h_tr = hashlib.sha256(images[tr].tobytes() + labels[tr].tobytes()).hexdigest()
    h_te = hashlib.sha256(images[te].tobytes() + labels[te].tobytes()).hexdigest()
    assert h_tr == "8174cdacdcb42b57d46fce839d340ff2da8894742d0c85d5c6e19676ed5473c1"
    assert h_te == "f7b98ae9fdc1a6a0430527ef06a26fa7cf99acd7bc624fe45df7931ec4c4b5fe"


def test_preprocessing_matches_formula(digits):
    images, labels = load_mnist10k()
    tr, _ = canonical_split()
    raw = torch.from_numpy(images[tr[:50]]).float()
    ref = F.interpolate((raw / 127.5 - 1.0).unsqueeze(1), size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(digits.train_x[:50], ref)
    assert digits.train_x.min() >= -1 and digits.train_x.max() <= 1
    y = digits.train_y
    assert torch.equal((y == 1).float().argmax(1), digits.train_labels)
    assert torch.all((y == 1).sum(1) == 1) and torch.all((y == -1).sum(1) == 9)


def _write_folder(tmp_path, n_train=20, n_test=10, compress=False, **bad):
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    files.update(bad)
    for name, arr in files.items():
        write_idx(tmp_path / (name + (".gz" if compress else "")), arr, compress=compress)
    return files


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    files = _write_folder(tmp_path, compress=compress)
    trx, try_, tex, tey = load_idx_folder(tmp_path)
    assert np.array_equal(trx, files["train-images-idx3-ubyte"])
    assert np.array_equal(tey, files["t10k-labels-idx1-ubyte"])
    d = load_dataset(str(tmp_path))
    assert d.train_x.shape == (20, 1, 16, 16) and d.test_x.shape == (10, 1, 16, 16)


def test_idx_rejects_bad_files(tmp_path):
    _write_folder(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    good = p.read_bytes()
    p.write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(UserError, match="magic"):
        read_idx(p)
    p.write_bytes(good[:-7])
    with pytest.raises(UserError, match="truncated"):
        read_idx(p)
    p.write_bytes(good[:2] + b"\x0d" + good[3:])
    with pytest.raises(UserError, match="type code"):
        read_idx(p)
    p.write_bytes(good[:3] + b"\x02" + good[4:])
    with pytest.raises(UserError):
        read_idx(p)
    p.write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(UserError, match="gzip"):
        read_idx(p)


def test_idx_folder_mismatched_labels(tmp_path):
    _write_folder(tmp_path, **{"train-labels-idx1-ubyte": np.zeros(19, dtype=np.uint8)})
    with pytest.raises(UserError, match="20 train images but 19 labels"):
        load_idx_folder(tmp_path)


def test_idx_folder_missing_files(tmp_path):
    with pytest.raises(UserError, match="no train-images"):
        load_idx_folder(tmp_path)
    with pytest.raises(UserError, match="no such file or folder"):
        load_dataset(str(tmp_path / "nope"))


def test_subset_larger_than_data(tmp_path):
    _write_folder(tmp_path)
    with pytest.raises(UserError, match="n_train=50"):
        load_dataset(str(tmp_path), n_train=50)


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def test_download_verifies_sha256(tmp_path, monkeypatch):
    blobs = {f"f{i}.gz": gzip.compress(bytes([i]) * 100) for i in range(2)}
    spec = {"base": "http://example.invalid/", "files": {k: hashlib.sha256(v).hexdigest() for k, v in blobs.items()}}
    monkeypatch.setitem(idxmod.DOWNLOADS, "toy", spec)
    served = dict(blobs)
    opener = lambda url: _FakeResponse(served[url.rsplit("/", 1)[1]])  # noqa: E731
    idxmod.download("toy", tmp_path / "ok", opener=opener)
    assert (tmp_path / "ok" / "f1.gz").read_bytes() == blobs["f1.gz"]
    served["f1.gz"] = b"tampered"
    with pytest.raises(UserError, match="SHA-256 mismatch"):
        idxmod.download("toy", tmp_path / "bad", opener=opener)
    assert not (tmp_path / "bad" / "f1.gz").exists()  # a bad file is never kept
    assert [p.name for p in (tmp_path / "bad").iterdir()] == ["f0.gz"]


def test_known_downloads_have_full_digests():
    names = {stems[0] + ".gz" for stems in idxmod._STEMS.values()}  # the names load_idx_folder looks for
    digests = []
    for name, spec in idxmod.DOWNLOADS.items():
        assert set(spec["files"]) == names, name
        for fname, h in spec["files"].items():
            # hexdigest() is lowercase: an uppercase or shortened digest could never match a download
            assert re.fullmatch(r"[0-9a-f]{64}", h), (name, fname, h)
            digests.append(h)
    assert len(set(digests)) == len(digests)  # no digest pasted twice


@pytest.mark.parametrize("name", sorted(idxmod.DOWNLOADS))
def test_known_download_refuses_other_bytes_in_one_line(tmp_path, name):
    spec = idxmod.DOWNLOADS[name]
    first = next(iter(spec["files"]))
    opener = lambda url: _FakeResponse(gzip.compress(b"not the published file"))  # noqa: E731
    with pytest.raises(UserError) as e:
        idxmod.download(name, tmp_path, opener=opener)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{first}: SHA-256 mismatch"), msg
    assert f"expected {spec['files'][first][:16]}" in msg  # checked against this dataset's own digest
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary is kept


def test_shift_images_and_shift_stack_against_index_arithmetic():
    """shift_images: out[i, c, y, x] = x[i, c, y - dy, x - dx], -1 off the image; shift_stack (the
    engine's per-pass copies for R replicas, numba) gives the same numbers for every replica,
    shifts past the image's edge included."""
    from backproplab.data.augment import shift_images, shift_stack
    rng = np.random.default_rng(3)
    B, C, H, W, R = 5, 2, 7, 6, 3
    x = torch.as_tensor(rng.normal(size=(B, C, H, W)), dtype=torch.float32)
    shifts = rng.integers(-8, 9, size=(R, B, 2)).astype(np.int8)
    shifts[0, 0] = (0, 0)
    want = np.full((R, B, C, H, W), -1.0, np.float32)
    for r in range(R):
        for i in range(B):
            dy, dx = shifts[r, i]
            for y in range(H):
                for v in range(W):
                    if 0 <= y - dy < H and 0 <= v - dx < W:
                        want[r, i, :, y, v] = x[i, :, y - dy, v - dx]
    for r in range(R):
        assert torch.equal(shift_images(x, shifts[r]), torch.from_numpy(want[r]))
    got = shift_stack(x, shifts)
    assert got.shape == (R, B, C, H, W) and torch.equal(got, torch.from_numpy(want))
    assert torch.equal(shift_stack(x.double(), shifts), torch.from_numpy(want).double())  # the torch path
    xr = torch.stack([x, -x, 2 * x])                     # each replica its own batch
    got = shift_stack(xr, shifts.astype(np.int64))
    for r in range(R):
        assert torch.equal(got[r], shift_images(xr[r], shifts[r]))
