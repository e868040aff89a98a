"""`backproplab fetch NAME DIR`: download a known IDX dataset, each file checked by SHA-256."""
import json


def register(sub, add_common):
    f = sub.add_parser("fetch", help="download MNIST or Fashion-MNIST IDX files (SHA-256 checked) into a folder")
    add_common(f)
    f.add_argument("name", help="mnist or fashion-mnist")
    f.add_argument("folder", help="where the four .gz files go; then use --data FOLDER")


def cmd_fetch(args):
    from ..data.idx import download, load_idx_folder
    folder = download(args.name, args.folder)
    load_idx_folder(folder)  # the files parse: magic numbers, dimensions, label counts
    print(f"{args.name}: IDX files verified in {folder}; use --data {folder}")
    if args.json:
        print(json.dumps({"dataset": args.name, "folder": str(folder)}))
    return 0


COMMANDS = {"fetch": cmd_fetch}
