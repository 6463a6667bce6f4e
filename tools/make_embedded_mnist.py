"""Build cnnx/_embedded/mnist_subset.npz: the fixed, class-balanced MNIST subset shipped with cnnx.

    python tools/make_embedded_mnist.py [--mnist-dir /work/shared/data/mnist] [--out cnnx/_embedded/mnist_subset.npz]

Selection (no randomness): for each digit 0..9, the first 600 images of that digit in MNIST's training
file (train-images-idx3-ubyte) and the first 100 of that digit in the test file (t10k-images-idx3-ubyte),
kept in file order. The archive holds

    train_images (6000, 28, 28) uint8   train_labels (6000,) uint8   train_indices (6000,) int32
    test_images  (1000, 28, 28) uint8   test_labels  (1000,) uint8   test_indices  (1000,) int32

where *_indices are the positions in the original files (provenance). It is a deflate-compressed zip of
.npy members with fixed timestamps, so the same input files give a byte-identical output; the script
verifies the inputs' SHA-256 against the published values first and prints the output's SHA-256.
MNIST is by Yann LeCun, Corinna Cortes and Christopher J. C. Burges, licensed CC BY-SA 3.0.
"""
import argparse
import hashlib
import io
import os
import sys
import zipfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cnnx.datasets import MNIST, _sha256, read_idx  # noqa: E402

TRAIN_PER_CLASS = 600
TEST_PER_CLASS = 100


def first_per_class(labels, per_class, num_classes=10):
    """Indices (sorted) of the first `per_class` items of each class, in file order."""
    picked = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise SystemExit(f"class {c} has only {len(idx)} items, need {per_class}")
        picked.append(idx)
    return np.sort(np.concatenate(picked)).astype(np.int32)


def write_npz(path, arrays):
    """np.savez_compressed, but with fixed zip timestamps and member order so the bytes are reproducible."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue(), compresslevel=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist-dir", default="/work/shared/data/mnist",
                        help="folder with the four original MNIST .gz files")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                      "cnnx", "_embedded", "mnist_subset.npz"))
    args = parser.parse_args(argv)

    arrays = {}
    for split, prefix, per_class in (("train", "train", TRAIN_PER_CLASS), ("test", "t10k", TEST_PER_CLASS)):
        files = {kind: os.path.join(args.mnist_dir, f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz")
                 for kind in ("images", "labels")}
        for path in files.values():
            expected = MNIST.resources[os.path.basename(path)[:-3]]
            if _sha256(path) != expected:
                raise SystemExit(f"refusing to build from {path}: its SHA-256 is not the published {expected}")
        images, labels = read_idx(files["images"]), read_idx(files["labels"])
        idx = first_per_class(labels, per_class)
        arrays[f"{split}_images"] = images[idx]
        arrays[f"{split}_labels"] = labels[idx]
        arrays[f"{split}_indices"] = idx
        counts = np.bincount(labels[idx], minlength=10)
        print(f"{split}: {len(idx)} images, per class {counts.tolist()}")
    digest = write_npz(args.out, arrays)
    print(f"wrote {os.path.normpath(args.out)}: {os.path.getsize(args.out)} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
