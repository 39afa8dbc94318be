"""Train and evaluate an image classifier from a ``task: classification`` config.

The paper's classification experiment at full size: a regular, DCNv1 or DCNv2 ResNet/ResNeXt
(``dcn``, ``dcn_stages``) trained on an ImageFolder tree such as ImageNet (``configs/
imagenet_resnet50_dcnv2.yaml``, torchvision's reference ResNet-50 recipe), or offline on the embedded
deformed-fashion garments. It shares the detection trainer's machinery: resumable checkpoints
(iteration, optimizer, scheduler, every random generator, data order and augmentation), data
parallelism under torchrun, AMP, gradient clipping, metrics to JSON lines (and TensorBoard).
Evaluation reports top-1 and top-5 error and inference time per image.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import models
from .config import ClassifierConfig, required_path
from .loop import (
    TrainingRun,
    autocast_for,
    check_out_dir,
    device_for,
    eval_indices,
    init_distributed,
    model_source,
)
from .pretrain import norm_layer_for
from .trainer import lr_factor, warmup

if TYPE_CHECKING:  # the datasets' modules are imported when needed
    from torchvision.datasets import ImageFolder

    from ..data.deformed_fashion import DeformedFashionClassification

__all__ = [
    "ClassifierResult",
    "build_classification_datasets",
    "build_classification_val_dataset",
    "build_classifier",
    "evaluate_classifier",
    "load_trained_classifier",
    "train_classifier",
]


@dataclass
class ClassifierResult:
    """What :func:`train_classifier` returns (errors are fractions; None without evaluation)."""

    out_dir: Path
    iterations: int
    final_loss: float | None
    top1_error: float | None
    top5_error: float | None
    metrics: dict[str, Any] | None
    train_seconds: float
    parameters: int


def build_classification_datasets(
    cfg: ClassifierConfig,
) -> tuple[ImageFolder | DeformedFashionClassification, ImageFolder | DeformedFashionClassification, int]:
    """(train, val, number of classes); items are ``(image [3, S, S] float32, class index)``."""
    if cfg.dataset == "imagefolder":
        from ..data.image_folder import image_folder_datasets

        train, val = image_folder_datasets(
            required_path(cfg.train_dir, "train_dir", "imagefolder"),
            required_path(cfg.val_dir, "val_dir", "imagefolder"),
            cfg.image_size,
            cfg.resize_size,
        )
        return train, val, len(train.classes)
    from torchvision.transforms import v2

    from ..data import deformed_fashion_classification

    train = deformed_fashion_classification(
        "train", cfg.num_train, channels=3, out_dir=cfg.data_dir,
        transform=v2.Compose([v2.RandomHorizontalFlip(), *_fashion_tail(cfg)]),
    )  # fmt: skip
    return train, build_classification_val_dataset(cfg), len(train.classes)


def build_classification_val_dataset(cfg: ClassifierConfig) -> ImageFolder | DeformedFashionClassification:
    """The validation set alone (evaluation transforms), e.g. to evaluate a trained classifier without
    the training set; items are ``(image [3, S, S] float32, class index)``, class indices in the order
    training used (sorted class folders, as the training folder's must be the same)."""
    if cfg.dataset == "imagefolder":
        from ..data.image_folder import image_folder_dataset

        val_dir = required_path(cfg.val_dir, "val_dir", "imagefolder")
        return image_folder_dataset(val_dir, False, cfg.image_size, cfg.resize_size, "val_dir")
    from torchvision.transforms import v2

    from ..data import deformed_fashion_classification

    return deformed_fashion_classification(
        "val", cfg.num_val, channels=3, out_dir=cfg.data_dir, transform=v2.Compose(_fashion_tail(cfg))
    )


def _fashion_tail(cfg: ClassifierConfig) -> list:
    """The deformed-fashion transforms both splits end with: resize to ``image_size``, normalise."""
    from torchvision.transforms import v2

    from ..data.image_folder import IMAGENET_MEAN, IMAGENET_STD

    return [v2.Resize(cfg.image_size, antialias=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def load_trained_classifier(
    source: str | Path | dict[str, Any], cfg: ClassifierConfig | None = None
) -> nn.Module:
    """A classifier from its ``model_final.pth`` or ``checkpoint_last.pth`` (config from the file):
    ``source`` is its path, or what :func:`read_model_file` already read from it."""
    from .config import config_from_dict

    state, config = model_source(source, "fc.weight", classifier=True, need_config=cfg is None)
    if cfg is None:
        assert config is not None  # model_source checked it (need_config)
        cfg = config_from_dict(config, ClassifierConfig)
    model = build_classifier(cfg, state["fc.weight"].shape[0])
    model.load_state_dict(state)
    return model


def build_classifier(cfg: ClassifierConfig, num_classes: int) -> nn.Module:
    """The config's ResNet/ResNeXt with DCN in ``dcn_stages`` (none when ``dcn`` is None) and its
    ``stem``; input [N, 3, H, W] -> logits [N, num_classes]."""
    norm_layer = norm_layer_for(cfg.norm)
    model = models.BACKBONES[cfg.arch](
        dcn=cfg.dcn, dcn_stages=cfg.dcn_stages, offset_groups=cfg.offset_groups,
        norm_layer=norm_layer, num_classes=num_classes,
    )  # fmt: skip
    if cfg.stem == "small":
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, padding=1, bias=False)
        model.maxpool = nn.MaxPool2d(2)
    return model


def learning_rate_factor(cfg: ClassifierConfig, iteration: int) -> float:
    """Warmup, then step decay (as the detector's) or a cosine to zero over ``iterations``."""
    if cfg.lr_schedule == "step":
        return lr_factor(cfg, iteration)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(iteration, cfg.iterations) / cfg.iterations))
    return cosine * warmup(cfg, iteration)


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, dataset: Dataset, cfg: ClassifierConfig, device: torch.device
) -> dict[str, Any]:
    """Top-1 / top-5 error and inference ms per image on ``dataset`` (``eval_max_images`` of its
    images spaced evenly over it, so that a class-ordered dataset contributes every class), each
    process taking every world-th image; the counts and inference seconds are summed over processes."""
    core: nn.Module = getattr(model, "module", model)  # the model inside a DistributedDataParallel
    if not isinstance(dataset, Sized):
        raise TypeError(f"dataset must be a map-style dataset with a length, got {type(dataset).__name__}")
    was_training = core.training
    core.eval()
    shard = Subset(dataset, eval_indices(len(dataset), cfg.eval_max_images, spread=True))
    loader = DataLoader(shard, batch_size=cfg.batch_size, num_workers=cfg.workers)
    totals = torch.zeros(4, dtype=torch.float64)  # images, top-1 correct, top-5 correct, seconds
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        began = time.perf_counter()
        with autocast_for(cfg, device):
            logits = core(images)
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
        hits = top == labels[:, None]
        totals += torch.tensor([len(labels), hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), seconds])
    if dist.is_initialized():
        reduced = totals.to(device)
        dist.all_reduce(reduced)
        totals = reduced.cpu()
    core.train(was_training)
    images = max(int(totals[0]), 1)
    return {
        "top1_error": 1.0 - float(totals[1]) / images,
        "top5_error": 1.0 - float(totals[2]) / images,
        "images": int(totals[0]),
        # every process's seconds over every process's images: the mean time per image on one device
        "inference_ms_per_image": 1000 * float(totals[3]) / images,
    }


def train_classifier(
    cfg: ClassifierConfig, *, resume: bool = False, evaluate_at_end: bool = True
) -> ClassifierResult:
    """Train the classifier ``cfg`` describes; checkpoints and metrics go to ``cfg.out_dir``.

    Args:
        cfg: a validated :class:`~deformable.engine.config.ClassifierConfig`.
        resume: continue from ``out_dir/checkpoint_last.pth`` when it exists (exactly: the next
            iterations see the batches and augmentations an uninterrupted run would).
        evaluate_at_end: compute top-1/top-5 error on the validation set after the last iteration.
    """
    cfg.validate()
    device = device_for(cfg)
    rank, world = init_distributed(device)
    out_dir = Path(cfg.out_dir)
    check_out_dir(out_dir)
    train_set, val_set, num_classes = build_classification_datasets(cfg)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ValueError(f"config key 'num_classes' is {cfg.num_classes} but the dataset has {num_classes}")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_classifier(cfg, num_classes).to(device)
    run = TrainingRun(cfg, model, device, lambda it: learning_rate_factor(cfg, it), rank, world, resume)

    def evaluate_now() -> dict[str, Any]:
        return evaluate_classifier(model, val_set, cfg, device)

    loss_value = None
    for images, labels in run.loader(train_set):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast_for(cfg, device):
            logits = run.train_model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        loss_value = float(loss.detach())
        run.step(loss, {"loss": loss_value}, evaluate_now)
    metrics = run.finish(evaluate_now if evaluate_at_end else None)
    return ClassifierResult(
        out_dir, run.iteration, loss_value,
        metrics["top1_error"] if metrics else None, metrics["top5_error"] if metrics else None,
        metrics, run.seconds, run.parameters,
    )  # fmt: skip
