"""Backbone pre-training on the embedded data: the offline stand-in for ImageNet weights.

The paper's detectors start from an ImageNet-pretrained ResNet; its deformable layers start as the
pretrained convolutions with zero offsets (and masks of 0.5) and learn to deform while the detector
trains. A detector trained from scratch for a few hundred iterations on a CPU is nowhere near that
regime. So, offline, the backbone is first trained to classify single deformed garments (the
classification variant of "deformed fashion": the detection set's objects under the same warps),
once, and cached; every detection row then starts from the same weights, exactly as the paper's rows
start from the same ImageNet model.

The file has torchvision's ResNet layout (a 1000-way ``fc`` of which the ten garment classes are
trained), so it loads through ``weights_backbone`` like any torchvision checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ..data.deformed_fashion import cache_root, deformed_fashion_classification
from ..data.image_folder import IMAGENET_MEAN, IMAGENET_STD
from ..models import param_groups
from .checkpointing import atomic_save, atomic_write_text

# The backbones pre-training can train (torchvision ResNets that take a norm_layer); a subset of
# deformable.models.BACKBONES (config key 'backbone').
PRETRAINABLE = ("resnet18", "resnet34", "resnet50", "resnet101")
BATCH_SIZE = 64
LEARNING_RATE = 0.1
CANVAS = 64  # canvas side: garments of 14-40 px, the detection set's object sizes
_VERSION = 1  # bump when the recipe changes, so stale cached weights are not reused


def norm_layer_for(norm: str):
    """The normalisation layer factory of a config's ``norm``: GroupNorm(32) for "gn", else None
    (the builders' default) or BatchNorm."""
    if norm == "gn":
        return lambda channels: nn.GroupNorm(min(32, channels), channels)
    if norm in ("bn", "auto"):
        return nn.BatchNorm2d
    raise ValueError(f"pre-training supports norm 'gn', 'bn' or 'auto', got {norm!r}")


# torchvision's detection transform normalises with ImageNet's statistics; the classifier sees the same.
_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """Grey uint8 [B, H, W] -> float [B, 3, H, W] on the images' device (grey repeated, as the
    detection canvases are), normalised as the detector's transform does."""
    mean, std = _MEAN.to(images.device), _STD.to(images.device)
    return (images.unsqueeze(1).float() / 255 - mean) / std


def pretrained_backbone(
    arch: str,
    norm: str,
    iterations: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> Path:
    """Path of a ResNet ``arch`` pre-trained for ``iterations`` on deformed-fashion classification.

    Trained on first use, on ``device`` (a few minutes on a CPU for the demo's 600 iterations; the
    detector trainer passes its own device), and cached under
    ``<cache_root>/pretrained/`` (written to a temporary file, then renamed, so an interrupted run
    never leaves a truncated file); later calls return the cached file. Top-1 accuracy on held-out
    images (1000; 100 for runs under 100 iterations) is written beside it as JSON.
    """
    if not isinstance(iterations, int) or iterations <= 0:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if arch not in PRETRAINABLE:
        raise ValueError(f"pre-training supports {'/'.join(PRETRAINABLE)}, got {arch!r}")
    norm_layer = norm_layer_for(norm)
    recipe = dict(arch=arch, norm=norm, iterations=iterations, batch=BATCH_SIZE, lr=LEARNING_RATE, v=_VERSION)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root(cache_dir) / "pretrained"
    path = folder / f"{arch}_{norm}_{iterations}it_{key}.pth"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)

    num_train = min(6000, max(320, iterations * BATCH_SIZE // 4))
    train_set = deformed_fashion_classification("train", num_train, canvas_size=CANVAS, out_dir=cache_dir)
    num_val = 1000 if iterations >= 100 else 100  # short runs (tests) need no precise accuracy
    val_set = deformed_fashion_classification("val", num_val, canvas_size=CANVAS, out_dir=cache_dir)
    device = torch.device(device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, norm_layer=norm_layer).to(device)
    optimizer = torch.optim.SGD(param_groups(model, LEARNING_RATE, 1e-4), lr=LEARNING_RATE, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=iterations
    )
    generator = torch.Generator().manual_seed(0)
    began = time.perf_counter()
    model.train()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=iterations, desc=f"pre-training {arch} ({norm})", leave=False)
    for _ in range(iterations):
        index = torch.randint(len(train_set.labels), (BATCH_SIZE,), generator=generator)
        images, labels = train_set.images[index].to(device), train_set.labels[index].to(device)
        logits = model(_normalise(images))[:, :10]  # the ten garment classes
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    if bar is not None:
        bar.close()

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(val_set.labels), 250):
            logits = model(_normalise(val_set.images[start : start + 250].to(device)))[:, :10]
            correct += (logits.argmax(1).cpu() == val_set.labels[start : start + 250]).sum().item()
    accuracy = correct / len(val_set.labels)
    report = dict(
        recipe,
        val_images=num_val,
        top1_accuracy=accuracy,
        seconds=round(time.perf_counter() - began, 1),
        train_images=num_train,
    )
    # The report first: the weights file is what marks the cache entry as done.
    atomic_write_text(json.dumps(report, indent=2), path.with_suffix(".json"))
    atomic_save({key: value.cpu() for key, value in model.state_dict().items()}, path)  # loads anywhere
    print(f"pre-trained {arch} ({norm}): top-1 accuracy {100 * accuracy:.1f}% on held-out garments -> {path}")
    return path
