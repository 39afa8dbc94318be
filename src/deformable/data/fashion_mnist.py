"""The shipped Fashion-MNIST subset (``assets/fashion_mnist_subset.npz``; MIT, Zalando SE 2017).

250 training and 80 test images per class (3300 in all, 28x28 uint8, original pixels), the first of each
class in the original files' order; see ``assets/LICENSE-fashion-mnist.txt`` and ``_make_fashion_subset``.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

import numpy as np

__all__ = ["CLASSES", "asset_sha256", "load_subset", "object_masks"]

CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_ASSET = "fashion_mnist_subset.npz"
_SPLITS = {"train": "train", "val": "test", "test": "test"}
# A pixel above this grey value (of 255) belongs to the garment before hole filling.
_MASK_THRESHOLD = 12


def _asset_bytes() -> bytes:
    return resources.files("deformable.data").joinpath("assets").joinpath(_ASSET).read_bytes()


@functools.lru_cache(maxsize=1)
def asset_sha256() -> str:
    """SHA-256 of the shipped ``.npz`` (part of every generated dataset's cache key)."""
    return hashlib.sha256(_asset_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def _arrays() -> dict[str, np.ndarray]:
    import io

    with np.load(io.BytesIO(_asset_bytes())) as z:
        return {k: z[k] for k in z.files}


def load_subset(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N, 28, 28], labels int64 [N])`` of a split.

    ``split``: ``"train"`` (2500 images from Fashion-MNIST's training file) or ``"val"``/``"test"``
    (800 images from its test file). Arrays are read-only and shared between calls.
    """
    if not isinstance(split, str) or split not in _SPLITS:
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    arrays = _arrays()
    name = _SPLITS[split]
    images = arrays[f"{name}_images"]
    labels = arrays[f"{name}_labels"].astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _fill_holes(fg: np.ndarray) -> np.ndarray:
    """Fill the holes of boolean masks [N, H, W]: background not 4-connected to the border joins fg."""
    bg = ~fg
    reach = np.zeros_like(fg)
    reach[:, 0, :] = bg[:, 0, :]
    reach[:, -1, :] = bg[:, -1, :]
    reach[:, :, 0] = bg[:, :, 0]
    reach[:, :, -1] = bg[:, :, -1]
    while True:
        grown = reach.copy()
        grown[:, 1:, :] |= reach[:, :-1, :]
        grown[:, :-1, :] |= reach[:, 1:, :]
        grown[:, :, 1:] |= reach[:, :, :-1]
        grown[:, :, :-1] |= reach[:, :, 1:]
        grown &= bg
        if np.array_equal(grown, reach):
            return ~reach
        reach = grown


@functools.lru_cache(maxsize=3)
def object_masks(split: str) -> np.ndarray:
    """Garment silhouettes of a split's images: bool [N, 28, 28], pixels > 12/255 with holes filled."""
    images, _ = load_subset(split)
    masks = _fill_holes(images > _MASK_THRESHOLD)
    masks.setflags(write=False)
    return masks
