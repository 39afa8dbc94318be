"""Iteration-based training and evaluation of the detectors, on one process or many (torchrun).

Reproducibility and resumption:
- The data order and every sample's augmentation are functions of (seed, epoch, index) alone: each
  epoch's permutation comes from its own generator and each sample is transformed under its own seed
  (with the global generator saved and restored around it), whatever the number of loader workers.
- Checkpoints (every ``checkpoint_every`` iterations, written atomically) hold the model, optimizer,
  scheduler, iteration and the state of every random generator, so ``resume=True`` continues exactly
  where the last checkpoint left off: a killed run loses at most the work since that checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import models
from .config import ClassifierConfig, TrainConfig, detector_builders, required_path
from .loop import (  # re-exported: the names runs, tests and the CLI have always imported from here
    CHECKPOINT_NAME,
    FINAL_NAME,
    IterationBatchSampler,
    SeededSamples,
    TrainingRun,
    autocast_for,
    barrier,
    check_out_dir,
    device_for,
    eval_indices,
    init_distributed,
    model_source,
    read_model_file,  # noqa: F401 (re-exported)
)
from .pretrain import norm_layer_for, pretrained_backbone

__all__ = [
    "CHECKPOINT_NAME",
    "FINAL_NAME",
    "IterationBatchSampler",
    "SeededSamples",
    "TrainResult",
    "build_datasets",
    "build_model",
    "evaluate",
    "load_trained_model",
    "lr_factor",
    "train",
]

# ------------------------------------------------------------------------------------------------
# Data


def build_datasets(cfg: TrainConfig):
    """(train, val) CocoDetection datasets with the config's transforms."""
    from ..data import CocoDetection, deformed_fashion, eval_transforms, train_transforms

    if cfg.scale_jitter:
        low, high = cfg.scale_jitter
        sizes: int | list[int] = sorted(
            {max(1, round(cfg.min_size * f)) for f in torch.linspace(low, high, 5).tolist()}
        )
    else:
        sizes = cfg.min_size
    train_tf = train_transforms(sizes, cfg.max_size, hflip_prob=0.5 if cfg.hflip else 0.0)
    eval_tf = eval_transforms(cfg.min_size, cfg.max_size)
    if cfg.dataset == "deformed_fashion":
        train = deformed_fashion.load(
            "train", transforms=train_tf, out_dir=cfg.data_dir, preset=cfg.data_preset
        )
        val = deformed_fashion.load("val", transforms=eval_tf, out_dir=cfg.data_dir, preset=cfg.data_preset)
    else:
        train = CocoDetection(
            required_path(cfg.train_images, "train_images", "coco"),
            required_path(cfg.train_annotations, "train_annotations", "coco"),
            train_tf,
            remove_empty=True,
        )
        val = CocoDetection(
            required_path(cfg.val_images, "val_images", "coco"),
            required_path(cfg.val_annotations, "val_annotations", "coco"),
            eval_tf,
        )
    return train, val


# ------------------------------------------------------------------------------------------------
# Model and optimisation


def _norm_layer(cfg: TrainConfig):
    from torchvision.ops.misc import FrozenBatchNorm2d

    if cfg.norm == "gn":
        return norm_layer_for("gn")
    return {"auto": None, "bn": nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d}[cfg.norm]


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The detector a config describes (``num_classes`` includes background)."""
    builders = detector_builders()
    if cfg.model not in builders:
        raise ValueError(f"config key 'model' must be one of {builders}, got {cfg.model!r}")
    builder = getattr(models, cfg.model)
    kwargs: dict[str, Any] = dict(
        num_classes=num_classes,
        dcn=cfg.dcn,
        dcn_stages=tuple(cfg.dcn_stages),
        offset_groups=cfg.offset_groups,
        roi_pool=cfg.roi_pool,
        mimic=cfg.mimic,
        backbone=cfg.backbone,
        weights_backbone=cfg.weights_backbone,
        trainable_backbone_layers=cfg.trainable_backbone_layers,
        norm_layer=_norm_layer(cfg),
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.box_detections_per_img,
    )
    if cfg.representation_size != 1024:
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        channels = 256  # the FPN and C4 layouts both pool 256-channel maps
        kwargs["box_head"] = TwoMLPHead(channels * 7 * 7, cfg.representation_size)
        kwargs["box_predictor"] = FastRCNNPredictor(cfg.representation_size, num_classes)
        kwargs["num_classes"] = None  # torchvision takes the classes from the given predictor
    if cfg.roi_pool != "align" and cfg.roi_pool_hidden:
        kwargs["roi_pool_options"] = {"hidden_channels": tuple(cfg.roi_pool_hidden)}
    if cfg.mimic:
        kwargs["mimic_options"] = dict(
            rois_per_image=cfg.mimic_rois_per_image, patch_size=cfg.mimic_patch_size, select=cfg.mimic_select
        )
    if cfg.anchor_sizes and cfg.model.endswith("_fpn_dcn"):
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        sizes = tuple((s,) for s in cfg.anchor_sizes)
        kwargs["rpn_anchor_generator"] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    model = builder(**kwargs)
    if cfg.scale_jitter:
        _keep_training_scales(model)
    return model


def _keep_training_scales(model: nn.Module) -> None:
    """Let training images reach the network at the scale the dataset's jitter gave them.

    torchvision's detectors resize every image to ``min_size`` inside the model, which would undo the
    jitter; its transform's ``_skip_resize`` switch (what torchvision's own detection recipes set for
    dataset-side scale augmentation) skips that resize in training only. Evaluation still resizes
    to ``min_size``, as the evaluation transforms already did.
    """
    transform = model.transform
    if not hasattr(transform, "_skip_resize"):
        import torchvision

        raise RuntimeError(
            "config key 'scale_jitter' needs torchvision's GeneralizedRCNNTransform._skip_resize, which "
            f"this torchvision ({torchvision.__version__}) lacks"
        )
    transform._skip_resize = True


def warmup(cfg, iteration: int) -> float:
    """Linear warmup multiplier: ``warmup_factor`` at iteration 0 rising to 1 at ``warmup_iterations``."""
    if iteration >= cfg.warmup_iterations:
        return 1.0
    alpha = iteration / cfg.warmup_iterations
    return cfg.warmup_factor * (1 - alpha) + alpha


def lr_factor(cfg: TrainConfig | ClassifierConfig, iteration: int) -> float:
    """Linear warmup from ``warmup_factor``, then x ``lr_gamma`` at every step in ``lr_steps``."""
    return cfg.lr_gamma ** sum(iteration >= step for step in cfg.lr_steps) * warmup(cfg, iteration)


# ------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, dataset, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """COCO AP of ``model`` on ``dataset`` (bbox, and segm for Mask R-CNN), plus inference time."""
    from ..data import collate_detection
    from .evaluation import Evaluator

    if not all(hasattr(dataset, name) for name in ("coco", "label_to_cat_id", "__getitem__", "__len__")):
        raise TypeError(
            f"dataset must be a CocoDetection (with .coco and .label_to_cat_id), got {type(dataset).__name__}"
        )
    core: nn.Module = getattr(model, "module", model)  # the model inside a DistributedDataParallel
    is_mask = isinstance(core, models.DCNMaskRCNN)
    was_training = core.training
    core.eval()
    indices = eval_indices(len(dataset), cfg.eval_max_images)
    evaluator = Evaluator(dataset.coco, dataset.label_to_cat_id, ("bbox", "segm") if is_mask else ("bbox",))
    seconds, images = 0.0, 0
    for start in range(0, len(indices), cfg.batch_size):
        batch = collate_detection([dataset[i] for i in indices[start : start + cfg.batch_size]])
        inputs = [image.to(device) for image in batch[0]]
        begin = time.perf_counter()
        with autocast_for(cfg, device):
            outputs = core(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - begin
        images += len(inputs)
        outputs = [{k: v.float().cpu() for k, v in o.items()} for o in outputs]
        evaluator.update(outputs, batch[1])
    metrics = evaluator.compute()
    core.train(was_training)
    return {**metrics, "inference_ms_per_image": 1000 * seconds / max(images, 1), "images": len(indices)}


# ------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    out_dir: Path
    iterations: int
    final_losses: dict[str, float]
    metrics: dict[str, Any] | None
    train_seconds: float
    parameters: int


def train(cfg: TrainConfig, *, resume: bool = False, evaluate_at_end: bool = True) -> TrainResult:
    """Train the detector ``cfg`` describes; checkpoints and metrics go to ``cfg.out_dir``.

    Args:
        resume: continue from ``out_dir/checkpoint_last.pth`` when it exists.
        evaluate_at_end: compute COCO AP on the validation set after the last iteration.
    """
    cfg.validate()
    device = device_for(cfg)
    rank, world = init_distributed(device)
    out_dir = Path(cfg.out_dir)
    check_out_dir(out_dir)
    torch.manual_seed(cfg.seed + rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    train_set, val_set = build_datasets(cfg)
    num_classes = train_set.num_classes + 1
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ValueError(
            f"config key 'num_classes' is {cfg.num_classes} but the dataset has {train_set.num_classes} "
            f"categories (+1 background = {num_classes})"
        )
    if cfg.pretrain_iterations and cfg.weights_backbone is None:
        if rank == 0:  # trained once (then cached); the other ranks wait and read the cache
            pretrained_backbone(
                cfg.backbone, cfg.norm, cfg.pretrain_iterations, cache_dir=cfg.data_dir, progress=cfg.progress
            )
        barrier()
        path = pretrained_backbone(cfg.backbone, cfg.norm, cfg.pretrain_iterations, cache_dir=cfg.data_dir)
        cfg.weights_backbone = str(path)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, num_classes).to(device)
    run = TrainingRun(cfg, model, device, lambda it: lr_factor(cfg, it), rank, world, resume)
    from ..data import collate_detection

    def evaluate_now() -> dict[str, Any]:
        return evaluate(model, val_set, cfg, device)

    losses_float: dict[str, float] = {}
    data_clock = time.perf_counter()
    for images, targets in run.loader(train_set, collate_detection):
        data_time = time.perf_counter() - data_clock
        images = [image.to(device) for image in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with autocast_for(cfg, device):
            loss_dict = run.train_model(images, targets)
        loss = sum(loss_dict.values())
        losses_float = {k: float(v.detach()) for k, v in loss_dict.items()}
        losses_float["loss"] = float(loss.detach())
        run.step(loss, {"data_time": data_time, **losses_float}, evaluate_now)
        data_clock = time.perf_counter()
    metrics = run.finish(evaluate_now if evaluate_at_end else None)
    return TrainResult(out_dir, run.iteration, losses_float, metrics, run.seconds, run.parameters)


def load_trained_model(
    source: str | Path | dict[str, Any], cfg: TrainConfig | None = None, num_classes: int | None = None
) -> nn.Module:
    """A model from ``model_final.pth`` or ``checkpoint_last.pth`` (config taken from the file):
    ``source`` is its path, or what :func:`read_model_file` already read from it."""
    from .config import config_from_dict

    key = "roi_heads.box_predictor.cls_score.weight"
    state, config = model_source(source, key, classifier=False, need_config=cfg is None)
    if cfg is None:
        assert config is not None  # model_source checked it (need_config)
        cfg = config_from_dict(config, TrainConfig)
    if num_classes is None:
        num_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
    model = build_model(_without_backbone_weights(cfg), num_classes)
    model.load_state_dict(state)
    return model


def _without_backbone_weights(cfg: TrainConfig) -> TrainConfig:
    """The same architecture, built without loading the backbone's starting weights.

    A trained model's file holds every weight, so reading the backbone's (a pre-training cache that
    may be gone, or ImageNet weights to be downloaded) would only be overwritten. The normalisation
    that ``norm: auto`` derived from having starting weights is kept, so the state dict's keys match.
    """
    norm = cfg.norm
    if norm == "auto":
        norm = "frozen_bn" if cfg.weights_backbone is not None else "bn"
    return replace(cfg, weights_backbone=None, norm=norm)
