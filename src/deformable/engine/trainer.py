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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
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

if TYPE_CHECKING:  # the data modules are imported when needed
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    from ..data import CocoDetection

__all__ = [
    "CHECKPOINT_NAME",
    "FINAL_NAME",
    "IterationBatchSampler",
    "SeededSamples",
    "TrainResult",
    "anchor_generator",
    "build_datasets",
    "build_model",
    "build_val_dataset",
    "evaluate",
    "load_trained_model",
    "lr_factor",
    "train",
    "training_categories",
]

# ------------------------------------------------------------------------------------------------
# Data


def build_datasets(cfg: TrainConfig) -> tuple[CocoDetection, CocoDetection]:
    """(train, val) CocoDetection datasets with the config's transforms; the validation set labels its
    objects as the training set does (see :func:`build_val_dataset`)."""
    from ..data import train_transforms

    if cfg.scale_jitter:
        low, high = cfg.scale_jitter
        sizes: int | list[int] = sorted(
            {max(1, round(cfg.min_size * f)) for f in torch.linspace(low, high, 5).tolist()}
        )
    else:
        sizes = cfg.min_size
    train_tf = train_transforms(sizes, cfg.max_size, hflip_prob=0.5 if cfg.hflip else 0.0)
    train = _detection_split(cfg, "train", train_tf)
    return train, build_val_dataset(cfg, train.categories, str(train.ann_file))


def _detection_split(cfg: TrainConfig, split: str, transforms) -> CocoDetection:
    """The ``split`` ("train" or "val") of the config's detection dataset, read through ``transforms``.

    Only Mask R-CNN's samples carry instance masks: the others skip decoding them (their evaluation
    reads the annotation file, not the samples). Training drops images without annotations, and boxes
    of zero width or height with a warning (COCO's train2017 has two), as detectron2 and mmdetection
    do; the validation set keeps every annotation, so its AP is the official one.

    Raises:
        ValueError: a Mask R-CNN model whose training annotations have no segmentation at all, or
            whose validation annotations lack one (mask AP is scored against every object's mask).
    """
    from ..data import CocoDetection, deformed_fashion

    masks = cfg.model.startswith("maskrcnn")
    if cfg.dataset == "deformed_fashion":
        return deformed_fashion.load(
            split, transforms=transforms, out_dir=cfg.data_dir, preset=cfg.data_preset, masks=masks
        )
    images, annotations = getattr(cfg, f"{split}_images"), getattr(cfg, f"{split}_annotations")
    dataset = CocoDetection(
        required_path(images, f"{split}_images", "coco"),
        required_path(annotations, f"{split}_annotations", "coco"),
        transforms,
        drop_degenerate=split == "train",
        remove_empty=split == "train",
        masks=masks,
    )
    if masks:
        _check_segmentations(dataset, cfg.model, f"{split}_annotations", whole=split == "val")
    return dataset


def _check_segmentations(dataset: CocoDetection, model: str, key: str, whole: bool) -> None:
    """A Mask R-CNN dataset needs segmentations: some (training: an object without one is trained on
    its box), or on every annotation (``whole``: validation, whose mask AP scores every object)."""
    lacking = [a["id"] for a in dataset.coco.anns.values() if not a.get("segmentation")]
    if not lacking or (not whole and len(lacking) < len(dataset.coco.anns)):
        return
    what = "none of the annotations has" if not whole else f"{len(lacking)} annotation(s) lack"
    raise ValueError(
        f"config key 'model' is {model!r}, which needs instance masks, but {what} a 'segmentation' in "
        f"{key} ({dataset.ann_file}; ids {lacking[:5]}): use a fasterrcnn_* model for boxes alone"
    )


def build_val_dataset(
    cfg: TrainConfig, categories: Sequence[Mapping[str, Any]] | None = None, source: str | None = None
) -> CocoDetection:
    """The validation CocoDetection alone (evaluation transforms), e.g. to evaluate a trained model.

    Args:
        categories: the training set's categories (dicts with ``id`` and ``name``, e.g.
            ``train.categories`` or what :func:`training_categories` finds): the validation set labels
            its objects as the training set did, so that a detector's label ``l`` is scored as the
            category it was trained on. None: the validation file's own categories (sorted ids).
        source: where ``categories`` come from, for the error message (default "the training set").

    Raises:
        ValueError: the validation file has categories that ``categories`` lack (naming both files).
    """
    from ..data import eval_transforms

    val = _detection_split(cfg, "val", eval_transforms(cfg.min_size, cfg.max_size))
    if categories is not None:
        val.use_categories(categories, source or "the training set")
    return val


def training_categories(cfg: TrainConfig, stored: Any = None) -> tuple[list[dict[str, Any]], str] | None:
    """(categories in label order, where from) of the training set, without building it: ``stored``
    (the ``categories`` a model file of :func:`train` holds) when it is a list, else those of the
    config's ``train_annotations`` when that file exists (dataset coco); None when neither is at hand
    (the deformed-fashion splits share their categories).
    """
    train_file = cfg.train_annotations if cfg.dataset == "coco" else None
    if isinstance(stored, list):
        return stored, str(train_file or "the training set")
    if train_file and Path(train_file).is_file():
        from ..data import load_coco_json

        categories = load_coco_json(train_file).get("categories")
        if not isinstance(categories, list):
            raise ValueError(f"{train_file}: top-level 'categories' must be a list, got {categories!r}")
        return categories, str(train_file)
    return None


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
        from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

        channels = 256  # the FPN and C4 layouts both pool 256-channel maps
        kwargs["box_head"] = TwoMLPHead(channels * 7 * 7, cfg.representation_size)
        kwargs["box_predictor"] = FastRCNNPredictor(cfg.representation_size, num_classes)
        if cfg.model.startswith("maskrcnn"):  # torchvision's default, which would need num_classes
            kwargs["mask_predictor"] = MaskRCNNPredictor(channels, channels, num_classes)
        kwargs["num_classes"] = None  # torchvision takes the classes from the given predictors
    if cfg.roi_pool != "align" and cfg.roi_pool_hidden is not None:
        kwargs["roi_pool_options"] = {"hidden_channels": tuple(cfg.roi_pool_hidden)}
    elif cfg.roi_pool == "dpool":
        # null kept its meaning when DeformRoIPool's default became the paper's single fc: one hidden
        # layer of 1024, so that the model files of earlier runs still load ([] is the single fc).
        kwargs["roi_pool_options"] = {"hidden_channels": (1024,)}
    if cfg.mimic:
        kwargs["mimic_options"] = dict(
            rois_per_image=cfg.mimic_rois_per_image, patch_size=cfg.mimic_patch_size, select=cfg.mimic_select
        )
    if cfg.anchor_sizes:
        kwargs["rpn_anchor_generator"] = anchor_generator(cfg.model, cfg.anchor_sizes)
    model = builder(**kwargs)
    if cfg.scale_jitter:
        _keep_training_scales(model)
    return model


def anchor_generator(model: str, sizes: Sequence[int]) -> AnchorGenerator:
    """The RPN's anchors of config key ``anchor_sizes`` (aspect ratios 0.5, 1, 2 at every size).

    An FPN detector (``*_fpn_dcn``) takes one size per pyramid level, P2..P6 (five: what
    :meth:`TrainConfig.validate` checks); a C4 detector (``*_c4_dcn``) has one feature map (conv4), so
    all the sizes go to that one level, as the paper's C4 RPN has 15 anchors per position.
    """
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if model.endswith("_c4_dcn"):
        return AnchorGenerator((tuple(sizes),), ((0.5, 1.0, 2.0),))
    levels = tuple((size,) for size in sizes)
    return AnchorGenerator(levels, ((0.5, 1.0, 2.0),) * len(levels))


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
    """COCO AP of ``model`` on ``dataset`` (bbox, and segm for Mask R-CNN), plus inference time.

    Under torch.distributed each process runs every world-th image and the metrics cover them all:
    ``images`` is the number evaluated by all processes together and ``inference_ms_per_image`` the
    model's time per image (seconds summed over processes / images summed over processes). Detections of
    categories the validation file does not list (a model trained on more) are left out, as COCOeval
    scores only the ground truth's categories.
    """
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
    scored = _scored_labels(dataset)
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
        if scored is not None:
            outputs = [_keep_labels(o, scored) for o in outputs]
        evaluator.update(outputs, batch[1])
    metrics = evaluator.compute()
    core.train(was_training)
    images, seconds = _summed_over_processes(images, seconds, device)
    return {**metrics, "inference_ms_per_image": 1000 * seconds / max(images, 1), "images": images}


def _scored_labels(dataset) -> torch.Tensor | None:
    """The labels [L] int64 whose categories the dataset's ground truth lists, or None when all are."""
    labels = [label for label, cat in dataset.label_to_cat_id.items() if cat in dataset.coco.cats]
    if len(labels) == len(dataset.label_to_cat_id):
        return None
    return torch.tensor(labels, dtype=torch.int64)


def _keep_labels(output: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One image's detections (every field indexed by detection along dim 0) of the given labels only."""
    keep = torch.isin(output["labels"].long(), labels)
    return {key: value[keep] for key, value in output.items()}


def _summed_over_processes(images: int, seconds: float, device: torch.device) -> tuple[int, float]:
    """(images, seconds) summed over the processes of torch.distributed (as given without one).

    The sums make ``seconds / images`` the model's mean time per image on one device, whatever the
    number of processes (each process times its own images; they run side by side, so the wall time of
    the whole evaluation is about the slowest process's, not the sum).
    """
    if not dist.is_initialized():
        return images, seconds
    totals = torch.tensor([float(images), seconds], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return int(totals[0].item()), float(totals[1].item())


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
                cfg.backbone, cfg.norm, cfg.pretrain_iterations,
                cache_dir=cfg.data_dir, progress=cfg.progress, device=device,
            )  # fmt: skip
        barrier()
        path = pretrained_backbone(cfg.backbone, cfg.norm, cfg.pretrain_iterations, cache_dir=cfg.data_dir)
        cfg.weights_backbone = str(path)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, num_classes).to(device)
    # The categories in label order go into the model files: `deformable eval` labels the validation
    # set as training did without the training set.
    metadata = {"categories": train_set.categories}
    run = TrainingRun(cfg, model, device, lambda it: lr_factor(cfg, it), rank, world, resume, metadata)
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
