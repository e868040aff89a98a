"""`backproplab fetch NAME DIR`: download a known IDX dataset, each file checked by SHA-256."""
import os
import tempfile
from pathlib import Path

from ..errors import UserError
from ..jsonout import emit_json


def register(sub, add_common):
    f = sub.add_parser("fetch", help="download MNIST or Fashion-MNIST IDX files (SHA-256 checked) into a folder")
    add_common(f)
    f.add_argument("name", help="mnist or fashion-mnist")
    f.add_argument("folder", help="where the four .gz files go; then use --data FOLDER")


def writable_folder(folder) -> Path:
    """The folder, created if needed, after a real write into it (permission bits do not bind
    root, and a read-only mount shows only on writing); UserError naming it otherwise."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cannot fetch into {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write into {folder}: {e.strerror or e}") from None
    return folder


def cmd_fetch(args):
    from ..data.idx import DOWNLOADS, download, load_idx_folder
    if args.name not in DOWNLOADS:
        raise UserError(f"unknown dataset {args.name!r}; known: {', '.join(DOWNLOADS)}")
    folder = writable_folder(args.folder)
    try:
        folder = download(args.name, folder)
    except OSError as e:  # the disk filling up or the folder vanishing mid-download
        raise UserError(f"cannot write into {folder}: {e.strerror or e}") from None
    load_idx_folder(folder)  # the files parse: magic numbers, dimensions, label counts
    print(f"{args.name}: IDX files verified in {folder}; use --data {folder}")
    if args.json:
        emit_json({"dataset": args.name, "folder": str(folder)})
    return 0


COMMANDS = {"fetch": cmd_fetch}
