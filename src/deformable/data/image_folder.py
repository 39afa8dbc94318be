"""Classification data: ImageFolder trees (ImageNet's layout) with the standard ResNet augmentation.

Training: RandomResizedCrop to ``image_size`` and a horizontal flip; evaluation: resize the shorter
side to ``resize_size`` and centre-crop ``image_size``; both normalise with ImageNet's mean and
standard deviation. Built on ``torchvision.datasets.ImageFolder`` and ``torchvision.transforms.v2``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision import datasets
from torchvision.transforms import v2

from ._checks import is_int

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "classification_transforms",
    "image_folder_dataset",
    "image_folder_datasets",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def classification_transforms(train: bool, image_size: int = 224, resize_size: int = 256) -> v2.Compose:
    """PIL image or uint8/float tensor [C, H, W] -> normalised float32 [3, image_size, image_size]."""
    for name, value in (("image_size", image_size), ("resize_size", resize_size)):
        if not is_int(value) or value <= 0:
            raise ValueError(f"{name} must be a positive int (pixels), got {value!r}")
    if train:
        geometry = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(resize_size, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(
        [
            v2.ToImage(),
            *geometry,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def image_folder_dataset(
    folder: str | Path, train: bool, image_size: int = 224, resize_size: int = 256, name: str = "folder"
) -> datasets.ImageFolder:
    """One split: an ImageFolder of ``folder`` (one sub-folder of images per class, class indices in
    sorted folder order) with the training (``train``) or evaluation transforms; items are
    ``(image [3, S, S] float32, class index)``.

    Raises:
        ValueError: ``folder`` (named ``name`` in the message) is missing or holds no images;
            ``image_size`` or ``resize_size`` is not a positive int.
    """
    transform = classification_transforms(train, image_size, resize_size)  # checks the sizes first
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{name} {path} is not a folder (expected one sub-folder of images per class)")
    try:
        return datasets.ImageFolder(str(path), transform=transform)
    except FileNotFoundError as error:  # no class folders, or no image files in them
        raise ValueError(f"{name} {path}: {error}") from error


def image_folder_datasets(
    train_dir: str | Path, val_dir: str | Path, image_size: int = 224, resize_size: int = 256
) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """(train, val) ImageFolder datasets; items are ``(image [3, S, S] float32, class index)``.

    Raises:
        ValueError: a folder is missing or holds no images, or the two splits' class folders differ
            (class indices would not agree); ``image_size`` or ``resize_size`` is not a positive int.
    """
    classification_transforms(True, image_size, resize_size)  # checks the sizes before reading folders
    train = image_folder_dataset(train_dir, True, image_size, resize_size, "train_dir")
    val = image_folder_dataset(val_dir, False, image_size, resize_size, "val_dir")
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise ValueError(
            f"train_dir and val_dir must hold the same class folders; only in train_dir: {only_train}, "
            f"only in val_dir: {only_val}"
        )
    return train, val
