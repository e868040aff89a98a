"""`backproplab fetch`: the real download path (urllib, SHA-256 before a file is kept), served
from a local file:// mirror so no test touches the network."""
import gzip

from backproplab.cli import main
from backproplab.data import idx
from test_cli import _idx_folder


def _mirror(tmp_path, monkeypatch, corrupt=None):
    src = _idx_folder(tmp_path / "raw")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    files = {}
    for p in sorted(src.iterdir()):
        gz = mirror / (p.name + ".gz")
        gz.write_bytes(gzip.compress(p.read_bytes()))
        files[gz.name] = idx.sha256_file(gz)
    if corrupt:
        files[corrupt] = "0" * 64
    monkeypatch.setitem(idx.DOWNLOADS, "tiny", {"base": mirror.as_uri() + "/", "files": files})
    return files


def test_fetch_downloads_verifies_and_loads(tmp_path, monkeypatch, capsys):
    files = _mirror(tmp_path, monkeypatch)
    dest = tmp_path / "data"
    assert main(["fetch", "tiny", str(dest), "--json"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == sorted(files)
    assert all(idx.sha256_file(dest / n) == d for n, d in files.items())
    train_x, train_y, test_x, test_y = idx.load_idx_folder(dest)
    assert train_x.shape == (30, 28, 28) and test_y.shape == (12,)
    assert '"folder"' in capsys.readouterr().out.strip().splitlines()[-1]


def test_fetch_refuses_a_checksum_mismatch_and_keeps_nothing(tmp_path, monkeypatch, capsys):
    _mirror(tmp_path, monkeypatch, corrupt="train-labels-idx1-ubyte.gz")
    dest = tmp_path / "data"
    assert main(["fetch", "tiny", str(dest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SHA-256 mismatch" in err[0] and "train-labels" in err[0]
    assert not (dest / "train-labels-idx1-ubyte.gz").exists()
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_fetch_unknown_dataset_is_one_line(capsys, tmp_path):
    assert main(["fetch", "cifar", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown dataset" in err[0]
