"""Build the shipped Fashion-MNIST subset (maintainers only; the package never runs this at import).

The asset ``assets/fashion_mnist_subset.npz`` holds the first ``TRAIN_PER_CLASS`` images of every class
of Fashion-MNIST's training file and the first ``TEST_PER_CLASS`` of every class of its test file, in
file order, with their original 8-bit pixels untouched. It is rebuilt from Debian's package
``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), which installs the original IDX
files under ``/usr/share/datasets/fashion-mnist``::

    python -m deformable.data._make_fashion_subset [--source DIR] [--out FILE]

Arrays in the ``.npz`` (N = 10 * per-class count):

- ``train_images`` uint8 [N_train, 28, 28], ``train_labels`` uint8 [N_train], ``train_index`` int32
  [N_train] (row in ``train-images-idx3-ubyte``);
- ``test_images``, ``test_labels``, ``test_index`` likewise for ``t10k-images-idx3-ubyte``.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path
from typing import Any

import numpy as np

TRAIN_PER_CLASS = 250
TEST_PER_CLASS = 80
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = Path(__file__).resolve().parent / "assets" / "fashion_mnist_subset.npz"


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes into an array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    rows = [np.flatnonzero(labels == c)[:per_class] for c in range(10)]
    for c, r in enumerate(rows):
        if len(r) < per_class:
            raise ValueError(f"class {c} has only {len(r)} images, need {per_class}")
    return np.sort(np.concatenate(rows)).astype(np.int32)


def build(source: Path = DEFAULT_SOURCE, out: Path = DEFAULT_OUT) -> Path:
    """Write the subset ``.npz`` to ``out`` and return its path."""
    # Any: mypy checks the **arrays of savez_compressed against its allow_pickle: bool keyword too.
    arrays: dict[str, Any] = {}
    for split, prefix, per_class in (("train", "train", TRAIN_PER_CLASS), ("test", "t10k", TEST_PER_CLASS)):
        images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
        index = _first_per_class(labels, per_class)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[index])
        arrays[f"{split}_labels"] = np.ascontiguousarray(labels[index])
        arrays[f"{split}_index"] = index
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the IDX .gz files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .npz path")
    args = parser.parse_args(argv)
    path = build(args.source, args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
