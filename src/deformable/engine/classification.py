"""The paper's classification experiment in small: regular vs DCNv1 vs DCNv2 ResNets.

``deformable demo --task classification`` trains three ResNet-18s (DCN in conv3-conv5 for v1 and v2)
from scratch on single deformed Fashion-MNIST garments (the detection set's geometric variation:
scale, rotation, shear, elastic warp) and reports top-1 error, parameters and the compute overhead
(training and inference time relative to the regular network, measured in the same run). The same
experiment at full size (ImageNet or any ImageFolder tree) is ``deformable train --config
imagenet_resnet50_dcnv2`` (:mod:`deformable.engine.classifier`).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models import resnet18_dcn

PRESETS = {
    "smoke": dict(num_train=320, num_val=160, iterations=10, batch_size=32, lr=0.05),
    "default": dict(num_train=6000, num_val=2000, iterations=300, batch_size=64, lr=0.1),
    "full": dict(num_train=6000, num_val=2000, iterations=3000, batch_size=128, lr=0.1),
}
VARIANTS = {"regular": None, "DCNv1 (conv3-5)": "v1", "DCNv2 (conv3-5)": "v2"}


def small_resnet(dcn: str | None, num_classes: int = 10) -> nn.Module:
    """ResNet-18 for 64x64 grey images: a 3x3 stride-1 stem and a 2x2 max-pool (layer1 at 32x32)."""
    model = resnet18_dcn(dcn=dcn, dcn_stages=(3, 4, 5), num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)
    model.maxpool = nn.MaxPool2d(2)
    return model


@dataclass
class ClassificationResult:
    name: str
    top1_error: float
    parameters: int
    train_ms_per_iter: float
    inference_ms_per_image: float


def _train_one(name, dcn, train_set, val_set, settings, seed) -> ClassificationResult:
    torch.manual_seed(seed)
    model = small_resnet(dcn)
    from ..models import param_groups

    optimizer = torch.optim.SGD(param_groups(model, settings["lr"], 1e-4), lr=settings["lr"], momentum=0.9)
    iterations, batch = settings["iterations"], settings["batch_size"]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=iterations
    )
    generator = torch.Generator().manual_seed(seed)
    images, labels = train_set.images, train_set.labels
    model.train()
    began = time.perf_counter()
    for _ in range(iterations):
        index = torch.randint(len(labels), (batch,), generator=generator)
        x = images[index].unsqueeze(1).float() / 255
        loss = F.cross_entropy(model(x), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    train_ms = 1000 * (time.perf_counter() - began) / iterations
    model.eval()
    wrong, began = 0, time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(val_set.labels), 256):
            x = val_set.images[start : start + 256].unsqueeze(1).float() / 255
            wrong += (model(x).argmax(1) != val_set.labels[start : start + 256]).sum().item()
    infer_ms = 1000 * (time.perf_counter() - began) / len(val_set.labels)
    parameters = sum(p.numel() for p in model.parameters())
    return ClassificationResult(name, wrong / len(val_set.labels), parameters, train_ms, infer_ms)


def run_classification_demo(
    preset: str = "default", out: str | Path = "demo_out", overrides: list[str] | None = None, seed: int = 0
) -> list[ClassificationResult]:
    """Train and evaluate the three variants; print the table and write ``classification.md``/``.csv``.

    ``overrides`` (``key=value``) change the preset's ``num_train``, ``num_val``, ``iterations``,
    ``batch_size`` or ``lr``.
    """
    from ..data import deformed_fashion_classification
    from .config import parse_overrides

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    settings = dict(PRESETS[preset])
    changes = parse_overrides(overrides)
    unknown = sorted(set(changes) - set(settings))
    if unknown:
        raise ValueError(f"unknown classification settings {unknown}; valid: {sorted(settings)}")
    settings.update(changes)
    train_set = deformed_fashion_classification("train", settings["num_train"])
    val_set = deformed_fashion_classification("val", settings["num_val"])
    results = [_train_one(name, dcn, train_set, val_set, settings, seed) for name, dcn in VARIANTS.items()]
    base = results[0]
    lines = [
        "| network | top-1 error (%) | params (M) | train ms/iter | inference ms/img "
        "| train cost | inference cost |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {100 * r.top1_error:.1f} | {r.parameters / 1e6:.2f} | {r.train_ms_per_iter:.0f} "
            f"| {r.inference_ms_per_image:.2f} | {r.train_ms_per_iter / base.train_ms_per_iter:.2f}x "
            f"| {r.inference_ms_per_image / base.inference_ms_per_image:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Classification on deformed fashion ({preset} preset, {settings['iterations']} iterations)\n\n"
    )
    (out / "classification.md").write_text(header + table + "\n")
    with (out / "classification.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["network", "top1_error", "parameters", "train_ms_per_iter", "inference_ms_per_image"]
        )
        for r in results:
            writer.writerow(
                [r.name, r.top1_error, r.parameters, r.train_ms_per_iter, r.inference_ms_per_image]
            )
    return results
