"""Detection augmentation built on torchvision.transforms.v2.

The pipelines take ``(image, target)`` where image is a ``tv_tensors.Image`` (uint8 or float, [3, H, W])
and target holds ``boxes`` as ``tv_tensors.BoundingBoxes`` and ``masks`` as ``tv_tensors.Mask``
([K, H, W]); v2 moves boxes and masks together with the image. Other target entries pass unchanged.

Resizing follows the detectors' rule: scale so the shorter side becomes ``min_size`` unless that makes
the longer side exceed ``max_size``, in which case the longer side becomes ``max_size``. Note that
torchvision's detectors resize internally too (``GeneralizedRCNNTransform``); resize here or there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from ._checks import is_number

__all__ = ["eval_transforms", "train_transforms"]


def _min_sizes(min_size: int | Sequence[int]) -> list[int]:
    if isinstance(min_size, str) or not isinstance(min_size, int | Sequence):
        raise ValueError(f"min_size must be a positive int or a non-empty sequence of them, got {min_size!r}")
    sizes = [min_size] if isinstance(min_size, int) else list(min_size)
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ValueError(f"min_size must be a positive int or a non-empty sequence of them, got {min_size!r}")
    return sizes


def _check_max_size(max_size: int | None, min_sizes: list[int] | None) -> None:
    if max_size is None:
        return
    if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size <= 0:
        raise ValueError(f"max_size must be a positive int or None, got {max_size!r}")
    if min_sizes is None:
        raise ValueError("max_size needs min_size")


def train_transforms(
    min_size: int | Sequence[int] | None = None,
    max_size: int | None = None,
    *,
    hflip_prob: float = 0.5,
) -> v2.Compose:
    """Training augmentation: random horizontal flip, then multi-scale resize, then float in [0, 1].

    Args:
        min_size: target shorter side; a sequence gives scale jitter (one value drawn uniformly per
            image, e.g. ``range(96, 161, 16)``); None keeps the image size.
        max_size: cap on the longer side (needs ``min_size``).
        hflip_prob: probability of the horizontal flip.
    """
    if not is_number(hflip_prob) or not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"hflip_prob must be a number in [0, 1], got {hflip_prob!r}")
    sizes = None if min_size is None else _min_sizes(min_size)
    _check_max_size(max_size, sizes)
    steps: list[v2.Transform] = [v2.RandomHorizontalFlip(p=hflip_prob)]
    if sizes is not None:
        steps.append(v2.RandomShortestSize(min_size=sizes, max_size=max_size, antialias=True))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def eval_transforms(min_size: int | None = None, max_size: int | None = None) -> v2.Compose:
    """Evaluation preprocessing: optional deterministic resize (shorter side ``min_size``, longer side at
    most ``max_size``), then float in [0, 1]. Predictions come out at the resized scale; the dataset's
    ``orig_size`` and ``size`` let :class:`deformable.engine.evaluation.Evaluator` map them back.
    """
    sizes = None if min_size is None else _min_sizes(min_size)
    if sizes is not None and len(sizes) != 1:
        raise ValueError(f"eval_transforms takes a single min_size, got {min_size!r}")
    _check_max_size(max_size, sizes)
    steps: list = []
    if sizes is not None:
        steps.append(
            _WithoutRandomness(v2.RandomShortestSize(min_size=sizes, max_size=max_size, antialias=True))
        )
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


class _WithoutRandomness:
    """A transform run with the global random state put back afterwards. RandomShortestSize with one
    size resizes deterministically but still draws its choice from the global generator: evaluated in
    the training process, every image moved the training's random stream, so a run's augmentations
    depended on how often and on how many images it evaluated (a resumed run with another
    ``eval_every`` no longer matched an uninterrupted one)."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, *inputs):
        with torch.random.fork_rng(devices=[]):
            return self.transform(*inputs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"
