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

import json
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import models
from .checkpointing import FORMAT, atomic_save, load_training_checkpoint, rng_state, set_rng_state
from .config import TrainConfig, dump_config
from .metrics_log import MetricsLog
from .pretrain import norm_layer_for, pretrained_backbone

CHECKPOINT_NAME = "checkpoint_last.pth"
FINAL_NAME = "model_final.pth"

# ------------------------------------------------------------------------------------------------
# Distributed helpers


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------------
# Data


class SeededSamples(Dataset):
    """Wraps a dataset so that item ``(epoch, index)`` is transformed under its own seed."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033 + index)
            return self.dataset[index]


class IterationBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` for iterations ``[start, stop)``, sharded over ranks.

    Every epoch is a fresh permutation drawn from ``seed`` and the epoch number; each rank takes
    every ``world``-th index of it and drops the incomplete last batch.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1
    ) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self.per_epoch = (size // world) // batch_size
        if self.per_epoch == 0:
            raise ValueError(
                f"the training set ({size} images) is smaller than one batch per process "
                f"(batch_size {batch_size} x {world} processes)"
            )

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, order = -1, None
        for iteration in range(self.start, self.stop):
            if iteration // self.per_epoch != epoch:
                epoch = iteration // self.per_epoch
                generator = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
                order = torch.randperm(self.size, generator=generator)[self.rank :: self.world]
            position = (iteration % self.per_epoch) * self.batch_size
            yield [(epoch, int(i)) for i in order[position : position + self.batch_size]]


def build_datasets(cfg: TrainConfig):
    """(train, val) CocoDetection datasets with the config's transforms."""
    from ..data import CocoDetection, deformed_fashion, eval_transforms, train_transforms

    if cfg.scale_jitter:
        low, high = cfg.scale_jitter
        sizes = sorted({max(1, round(cfg.min_size * f)) for f in torch.linspace(low, high, 5).tolist()})
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
        train = CocoDetection(cfg.train_images, cfg.train_annotations, train_tf, remove_empty=True)
        val = CocoDetection(cfg.val_images, cfg.val_annotations, eval_tf)
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
    builder = getattr(models, cfg.model, None)
    if builder is None or not cfg.model.endswith(("_fpn_dcn", "_c4_dcn")):
        raise ValueError(
            f"config key 'model' must name a detector builder of deformable.models, got {cfg.model!r}"
        )
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
    return builder(**kwargs)


def lr_factor(cfg: TrainConfig, iteration: int) -> float:
    """Linear warmup from ``warmup_factor``, then x ``lr_gamma`` at every step in ``lr_steps``."""
    factor = cfg.lr_gamma ** sum(iteration >= step for step in cfg.lr_steps)
    if iteration < cfg.warmup_iterations:
        alpha = iteration / cfg.warmup_iterations
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'device' is 'cuda' but no CUDA device is available")
    return torch.device(cfg.device)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _check_out_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"  # one per process: ranks share the folder
        probe.write_text("ok")
        probe.unlink(missing_ok=True)
    except OSError as error:
        raise ValueError(f"output folder {path} is not writable: {error}") from error


# ------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, dataset, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """COCO AP of ``model`` on ``dataset`` (bbox, and segm for Mask R-CNN), plus inference time."""
    from ..data import collate_detection
    from .evaluation import Evaluator

    core = model.module if hasattr(model, "module") else model
    is_mask = isinstance(core, models.DCNMaskRCNN)
    was_training = core.training
    core.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(len(dataset)))[: cfg.eval_max_images][rank::world]
    evaluator = Evaluator(dataset.coco, dataset.label_to_cat_id, ("bbox", "segm") if is_mask else ("bbox",))
    seconds, images = 0.0, 0
    for start in range(0, len(indices), cfg.batch_size):
        batch = collate_detection([dataset[i] for i in indices[start : start + cfg.batch_size]])
        inputs = [image.to(device) for image in batch[0]]
        begin = time.perf_counter()
        with _autocast(cfg, device):
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
    device = _device(cfg)
    rank, world = init_distributed(device)
    out_dir = Path(cfg.out_dir)
    _check_out_dir(out_dir)
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
        _barrier()
        path = pretrained_backbone(cfg.backbone, cfg.norm, cfg.pretrain_iterations, cache_dir=cfg.data_dir)
        cfg.weights_backbone = str(path)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, num_classes).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    groups = models.param_groups(model, cfg.lr, cfg.weight_decay)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    start, seconds_before = 0, 0.0  # iterations and training seconds of earlier (interrupted) runs
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if resume and checkpoint_path.exists():
        state = load_training_checkpoint(checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start = state["iteration"]
        seconds_before = float(state.get("train_seconds", 0.0))
        set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
    else:
        torch.manual_seed(cfg.seed * 31 + rank)
    if _is_main():
        dump_config(cfg, out_dir / "config.yaml")

    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    from ..data import collate_detection

    sampler = IterationBatchSampler(
        len(train_set), cfg.batch_size, cfg.seed, start, cfg.iterations, rank, world
    )
    loader = DataLoader(
        SeededSamples(train_set, cfg.seed),
        batch_sampler=sampler,
        collate_fn=collate_detection,
        num_workers=cfg.workers,
        # A private generator: creating the loader must not draw from the global one, or a resumed
        # run would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    log = MetricsLog(out_dir, cfg.tensorboard) if _is_main() else None
    progress = None
    if cfg.progress and _is_main():
        from tqdm import tqdm

        progress = tqdm(total=cfg.iterations, initial=start, desc=f"train {out_dir.name}", dynamic_ncols=True)
    model.train()
    # Training seconds of all runs so far, read at each checkpoint (before writing it): a resumed or
    # re-run job reports its whole cost, and the same number however often it was interrupted.
    seconds = seconds_before
    began = time.perf_counter()
    losses_float: dict[str, float] = {}
    iteration = start
    data_clock = time.perf_counter()
    for images, targets in loader:
        data_time = time.perf_counter() - data_clock
        images = [image.to(device) for image in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with _autocast(cfg, device):
            loss_dict = train_model(images, targets)
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at iteration {iteration}: {loss_dict}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        iteration += 1
        losses_float = {k: float(v.detach()) for k, v in loss_dict.items()}
        losses_float["loss"] = float(loss.detach())
        if _is_main():
            if progress is not None:
                progress.set_postfix(
                    loss=f"{losses_float['loss']:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}"
                )
                progress.update(1)
            if iteration % cfg.log_every == 0 or iteration == cfg.iterations:
                record = {"iteration": iteration, "lr": scheduler.get_last_lr()[0], "data_time": data_time}
                log.write({**record, **losses_float, "time": time.perf_counter() - began})
        if iteration % cfg.checkpoint_every == 0 or iteration == cfg.iterations:
            seconds = seconds_before + time.perf_counter() - began
            _save_checkpoint(checkpoint_path, model, optimizer, scheduler, scaler, iteration, cfg, seconds)
        if cfg.eval_every and iteration % cfg.eval_every == 0 and iteration < cfg.iterations:
            metrics = evaluate(model, val_set, cfg, device)
            if _is_main():
                log.write({"iteration": iteration, "eval": metrics})
        data_clock = time.perf_counter()
    if progress is not None:
        progress.close()
    if _is_main():
        atomic_save({"model": model.state_dict(), "config": cfg.to_dict()}, out_dir / FINAL_NAME)
    metrics = None
    if evaluate_at_end:
        metrics = evaluate(model, val_set, cfg, device)
        if _is_main():
            log.write({"iteration": iteration, "eval": metrics})
            (out_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
    if log is not None:
        log.close()
    _barrier()
    return TrainResult(out_dir, iteration, losses_float, metrics, seconds, parameters)


def _save_checkpoint(path, model, optimizer, scheduler, scaler, iteration, cfg, train_seconds) -> None:
    states = rng_state()
    if dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, states)
        states = gathered
    if _is_main():
        atomic_save(
            {
                "format": FORMAT,
                "iteration": iteration,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": states,
                "train_seconds": train_seconds,
                "config": cfg.to_dict(),
            },
            path,
        )
    _barrier()


def load_trained_model(
    path: str | Path, cfg: TrainConfig | None = None, num_classes: int | None = None
) -> nn.Module:
    """A model from ``model_final.pth`` or ``checkpoint_last.pth`` (config taken from the file)."""
    from .config import config_from_dict

    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"{path} holds no 'model' state dict")
    cfg = cfg or config_from_dict(data["config"])
    if num_classes is None:
        num_classes = data["model"]["roi_heads.box_predictor.cls_score.weight"].shape[0]
    model = build_model(cfg, num_classes)
    model.load_state_dict(data["model"])
    return model
