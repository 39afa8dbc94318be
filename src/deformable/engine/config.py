"""Flat experiment configs: YAML files in ``configs/`` plus ``--set key=value`` overrides.

A config is one flat mapping (no inheritance chains): every key is a field of :class:`TrainConfig`
(detection) or, with ``task: classification``, of :class:`ClassifierConfig`, checked for type on load,
and the resolved config is written into every run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._files import atomic_write_text

# Shipped inside the package so that pip-installed users have them too.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class TrainConfig:
    """Everything a training run needs. Iterations are counted in optimizer steps."""

    # model
    model: str = "fasterrcnn_resnet50_fpn_dcn"
    backbone: str = "resnet50"
    dcn: str | None = "v2"
    dcn_stages: list[int] = field(default_factory=lambda: [3, 4, 5])
    offset_groups: int = 1
    roi_pool: str = "mdpool"
    # Hidden fc widths of the pooling's offset branch; null: 1024, 1024 for mdpool and 1024 for dpool
    # (the widths earlier runs were trained with), [] for dpool: the paper's single fc.
    roi_pool_hidden: list[int] | None = None
    mimic: bool = False
    mimic_rois_per_image: int = 32
    mimic_patch_size: int = 224
    mimic_select: str = "foreground"
    weights_backbone: str | None = None
    # > 0 (and no weights_backbone): start from a backbone pre-trained for this many iterations on the
    # deformed-fashion classification images, trained once and cached (engine/pretrain.py)
    pretrain_iterations: int = 0
    trainable_backbone_layers: int | None = None
    norm: str = "auto"  # auto (frozen BN with weights, else BN) | bn | frozen_bn | gn
    num_classes: int | None = None  # None: from the dataset (categories + background)
    min_size: int = 800
    max_size: int = 1333
    anchor_sizes: list[int] | None = None
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100
    representation_size: int = 1024  # width of the 2fc box head (the paper's 1024)
    # data
    dataset: str = "deformed_fashion"  # deformed_fashion | coco
    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    data_preset: str = "default"  # deformed_fashion generation preset
    data_dir: str | None = None  # deformed_fashion cache folder (default ~/.cache/deformable)
    hflip: bool = True
    scale_jitter: list[float] | None = None  # e.g. [0.8, 1.2]
    workers: int = 0
    # optimisation (the paper: batch 16, lr 0.02, /10 at epochs 10 and 14 of 16)
    batch_size: int = 2
    iterations: int = 1000
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 500
    warmup_factor: float = 0.001
    lr_steps: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    clip_grad_norm: float | None = None
    amp: str = "none"  # none | bf16 | fp16
    seed: int = 0
    deterministic: bool = False
    # bookkeeping
    out_dir: str = "runs/default"
    checkpoint_every: int = 500
    log_every: int = 20
    eval_every: int = 0  # 0: only at the end
    eval_max_images: int | None = None  # None: the whole validation set
    progress: bool = True
    tensorboard: bool = True  # scalars to out_dir/tb as well, when the tensorboard package is installed
    device: str = "auto"  # auto | cpu | cuda

    def validate(self) -> TrainConfig:
        """Check values that types alone cannot; raise ValueError naming the key."""
        from ..data.deformed_fashion import PRESETS
        from ..models import BACKBONES

        choices = {
            "model": detector_builders(),
            "backbone": tuple(BACKBONES),
            "dcn": (None, "v1", "v2"),
            "roi_pool": ("mdpool", "dpool", "align"),
            # as torchvision's: how many of layer4, layer3, layer2, layer1, conv1 train (None: 3 or 5)
            "trainable_backbone_layers": (None, 0, 1, 2, 3, 4, 5),
            "dataset": ("deformed_fashion", "coco"),
            "data_preset": tuple(PRESETS),
            "norm": ("auto", "bn", "frozen_bn", "gn"),
            "mimic_select": ("foreground", "all", "background"),
        }
        positive = (
            "min_size", "max_size", "representation_size", "mimic_rois_per_image", "mimic_patch_size",
            "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_test", "box_batch_size_per_image", "box_detections_per_img",
        )  # fmt: skip
        _check_run(self, choices, positive)
        _check_each(
            self, ("anchor_sizes",), lambda v: v is None or (v and all(x > 0 for x in v)),
            "null or a non-empty list of positive integers",
        )  # fmt: skip
        # An empty list is DCNv1's single fc (no hidden layer); modulated pooling needs one at least.
        _check_each(
            self, ("roi_pool_hidden",),
            lambda v: v is None or ((v or self.roi_pool == "dpool") and all(x > 0 for x in v)),
            "null or a list of positive integers (empty only for roi_pool 'dpool': its single fc)",
        )  # fmt: skip
        if self.anchor_sizes is not None and self.model.endswith("_fpn_dcn") and len(self.anchor_sizes) != 5:
            raise ValueError(
                f"config key 'anchor_sizes' must have 5 entries for the FPN model {self.model!r} (one size "
                f"per pyramid level, P2-P6), got {len(self.anchor_sizes)}: {self.anchor_sizes}"
            )
        _check_each(
            self, ("scale_jitter",), lambda v: v is None or (len(v) == 2 and 0 < v[0] <= v[1]),
            "null or [low, high] with 0 < low <= high",
        )  # fmt: skip
        if self.pretrain_iterations < 0:
            raise ValueError(f"config key 'pretrain_iterations' must be >= 0, got {self.pretrain_iterations}")
        if self.pretrain_iterations and self.weights_backbone is None:
            from .pretrain import PRETRAINABLE

            if self.backbone not in PRETRAINABLE:
                raise ValueError(
                    f"config key 'backbone' must be one of {PRETRAINABLE} for pre-training "
                    f"(pretrain_iterations {self.pretrain_iterations}), got {self.backbone!r}: set "
                    "pretrain_iterations=0, or weights_backbone to starting weights"
                )
        if self.pretrain_iterations and self.norm == "frozen_bn":
            raise ValueError(
                "config key 'pretrain_iterations' needs norm 'gn', 'bn' or 'auto', got 'frozen_bn'"
            )
        if self.dataset == "coco":
            for key in ("train_images", "train_annotations", "val_images", "val_annotations"):
                if not getattr(self, key):
                    raise ValueError(f"config key {key!r} is required when dataset is 'coco'")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ClassifierConfig:
    """An image-classification run (``task: classification``): the paper's ImageNet experiment on any
    ImageFolder tree (``train_dir``/``val_dir`` with one folder per class), or the embedded
    deformed-fashion garments offline. Iterations are optimizer steps; ``batch_size`` is per process."""

    task: str = "classification"
    # model
    arch: str = "resnet50"  # a key of deformable.models.BACKBONES
    # imagenet: torchvision's 7x7/2 convolution + 3x3/2 max-pool (224 px images); small: a 3x3/1
    # convolution + 2x2 max-pool, so 64 px images reach conv5 at 4x4 rather than 2x2
    stem: str = "imagenet"
    dcn: str | None = "v2"
    dcn_stages: list[int] = field(default_factory=lambda: [3, 4, 5])
    offset_groups: int = 1
    norm: str = "bn"  # bn | gn
    num_classes: int | None = None  # None: from the dataset
    # data
    dataset: str = "imagefolder"  # imagefolder | deformed_fashion
    train_dir: str | None = None
    val_dir: str | None = None
    image_size: int = 224  # training crop and evaluation centre crop
    resize_size: int = 256  # evaluation resize before the centre crop
    num_train: int = 6000  # deformed_fashion only
    num_val: int = 2000
    data_dir: str | None = None  # deformed_fashion cache (default ~/.cache/deformable)
    workers: int = 8
    # optimisation
    batch_size: int = 32
    iterations: int = 450_360
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 0
    warmup_factor: float = 0.1
    lr_schedule: str = "step"  # step (x lr_gamma at lr_steps) | cosine
    lr_steps: list[int] = field(default_factory=lambda: [150_120, 300_240])
    lr_gamma: float = 0.1
    label_smoothing: float = 0.0
    clip_grad_norm: float | None = None
    amp: str = "none"  # none | bf16 | fp16
    seed: int = 0
    # bookkeeping
    out_dir: str = "runs/classifier"
    checkpoint_every: int = 2000
    log_every: int = 50
    eval_every: int = 0  # 0: only at the end
    eval_max_images: int | None = None  # None: the whole validation set; else spread over it
    progress: bool = True
    tensorboard: bool = True
    device: str = "auto"  # auto | cpu | cuda

    def validate(self) -> ClassifierConfig:
        """Check values that types alone cannot; raise ValueError naming the key."""
        from ..models import BACKBONES

        choices = {
            "task": ("classification",),
            "arch": tuple(BACKBONES),
            "stem": ("imagenet", "small"),
            "dcn": (None, "v1", "v2"),
            "norm": ("bn", "gn"),
            "dataset": ("imagefolder", "deformed_fashion"),
            "lr_schedule": ("step", "cosine"),
        }
        _check_run(self, choices, ("image_size", "resize_size", "num_train", "num_val"))
        if self.resize_size < self.image_size:
            raise ValueError(
                f"config key 'resize_size' ({self.resize_size}) must be >= image_size ({self.image_size})"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"config key 'label_smoothing' must be in [0, 1), got {self.label_smoothing}")
        if self.dataset == "imagefolder":
            for key in ("train_dir", "val_dir"):
                if not getattr(self, key):
                    raise ValueError(f"config key {key!r} is required when dataset is 'imagefolder'")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def detector_builders() -> tuple[str, ...]:
    """Names of the detector builders of :mod:`deformable.models`: the values of config key ``model``."""
    from .. import models

    return tuple(name for name in models.__all__ if name.endswith(("_fpn_dcn", "_c4_dcn")))


def required_path(value: str | None, key: str, dataset: str) -> str:
    """The value of config key ``key``, which dataset ``dataset`` needs (a ValueError naming it when unset,
    as :meth:`TrainConfig.validate` and :meth:`ClassifierConfig.validate` raise)."""
    if not value:
        raise ValueError(f"config key {key!r} is required when dataset is {dataset!r}")
    return value


def _check_run(config, choices: dict[str, tuple], positive: tuple[str, ...]) -> None:
    """The checks every run's config shares: ``choices`` (key -> allowed values, plus amp and device),
    ``positive`` keys (plus the run's sizes, intervals and optimiser settings), the DCN stages and
    increasing lr_steps. Every field is first checked for its annotated type (:func:`_check_type`), as
    :func:`config_from_dict` does, for configs built directly (``TrainConfig(lr="x")``)."""
    from ..models.backbones import check_dcn_stages

    for key, hint in typing.get_type_hints(type(config)).items():
        setattr(config, key, _check_type(key, getattr(config, key), hint))

    choices = {**choices, "amp": ("none", "bf16", "fp16"), "device": ("auto", "cpu", "cuda")}
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise ValueError(f"config key {key!r} must be one of {allowed}, got {getattr(config, key)!r}")
    common = ("batch_size", "iterations", "checkpoint_every", "log_every", "lr", "lr_gamma", "offset_groups")
    _check_each(config, (*common, *positive), lambda v: v > 0, "positive")
    # eval_every 0: only at the end; warmup_factor 0: the warmup starts from a zero learning rate
    non_negative = ("workers", "eval_every", "warmup_iterations", "warmup_factor", "weight_decay")
    _check_each(config, non_negative, lambda v: v >= 0, ">= 0")
    # eval_max_images None: the whole validation set (0 would evaluate nothing)
    _check_each(
        config, ("eval_max_images", "num_classes", "clip_grad_norm"), lambda v: v is None or v > 0,
        "null or positive",
    )  # fmt: skip
    _check_each(config, ("momentum",), lambda v: 0 <= v < 1, "in [0, 1)")
    check_dcn_stages(config.dcn_stages, name="config key 'dcn_stages'")
    if sorted(config.lr_steps) != list(config.lr_steps):
        raise ValueError(f"config key 'lr_steps' must be increasing, got {config.lr_steps}")


def _check_each(config, keys: tuple[str, ...], test, expected: str) -> None:
    """Raise a ValueError naming the first of ``keys`` whose value fails ``test`` (must be ``expected``)."""
    for key in keys:
        value = getattr(config, key)
        if not test(value):
            raise ValueError(f"config key {key!r} must be {expected}, got {value!r}")


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Coerce ``value`` to the field's annotated type or raise a ValueError naming the key."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        last_error = None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ValueError as error:
                last_error = error
        raise last_error or ValueError(f"config key {key!r}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ValueError(f"config key {key!r} must be a list, got {value!r}")
        return [_check_type(key, v, item) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if hint is int:
        return _as_int(key, value)
    if hint is float:
        return _as_float(key, value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"config key {key!r} must be a string, got {value!r}")
        return value
    return value


def _as_float(key: str, value: Any) -> float:
    """A finite number. Numeric strings count: YAML reads ``1e-3`` (no decimal point) as a string."""
    number = value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise ValueError(f"config key {key!r} must be a number, got {value!r}")
    try:
        number = float(number)
    except OverflowError:  # an integer beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
    return number


def _as_int(key: str, value: Any) -> int:
    """An integer, also written as an integral number such as ``1e3`` (a float, or YAML's string)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        number = _as_float(key, value)
    except ValueError:
        number = None
    if number is None or not number.is_integer():
        raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
    return int(number)


def config_from_dict(values: dict[str, Any], kind: type | None = None):
    """A validated config from a flat mapping; unknown keys are errors.

    ``kind`` is :class:`TrainConfig` (detection) or :class:`ClassifierConfig`; by default the
    mapping's ``task`` key decides ("classification" -> ClassifierConfig, else TrainConfig).
    """
    if not isinstance(values, Mapping):
        raise TypeError(f"values must be a mapping of config keys to values, got {type(values).__name__}")
    if kind is None:
        kind = ClassifierConfig if values.get("task") == "classification" else TrainConfig
    if kind not in (TrainConfig, ClassifierConfig):
        raise TypeError(f"kind must be TrainConfig, ClassifierConfig or None, got {kind!r}")
    values = dict(values)
    if kind is TrainConfig and values.pop("task", "detection") != "detection":
        raise ValueError("config key 'task' of a detection config must be 'detection'")
    hints = typing.get_type_hints(kind)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(hints)}")
    checked = {key: _check_type(key, value, hints[key]) for key, value in values.items()}
    return kind(**checked).validate()


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["lr=0.01", "dcn_stages=[5]"]`` -> ``{"lr": 0.01, "dcn_stages": [5]}`` (values read as YAML)."""
    if overrides is not None and (isinstance(overrides, str) or not isinstance(overrides, list | tuple)):
        raise TypeError(f"overrides must be a list of 'key=value' strings, got {overrides!r}")
    result = {}
    for item in overrides or []:
        if not isinstance(item, str):
            raise TypeError(f"overrides must be a list of 'key=value' strings, got the item {item!r}")
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            result[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise ValueError(f"--set {item!r}: the value is not valid YAML: {error}") from error
    return result


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file: a path, or the name of a file in ``configs/`` (with or without ``.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"config not found: {name_or_path} (looked in the working directory and {CONFIG_DIR})"
    )


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a detection config (or start from the defaults) and apply ``key=value`` overrides."""
    config = load_any_config(name_or_path, overrides, TrainConfig)
    assert isinstance(config, TrainConfig)
    return config


def load_any_config(
    name_or_path: str | Path | None = None, overrides: list[str] | None = None, kind: type | None = None
) -> TrainConfig | ClassifierConfig:
    """Read a YAML config and apply ``key=value`` overrides; its ``task`` key (or ``kind``) picks
    :class:`TrainConfig` (detection, the default) or :class:`ClassifierConfig`."""
    values: dict[str, Any] = {}
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"config {path} is not valid YAML: {error}") from error
        except UnicodeDecodeError as error:
            raise ValueError(
                f"config {path} is not UTF-8 text ({error.reason} at byte {error.start})"
            ) from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config {path} must hold a flat mapping of keys to values")
        values.update(loaded)
    values.update(parse_overrides(overrides))
    if kind is TrainConfig and values.get("task") == "classification":
        raise ValueError(
            f"{name_or_path} is a classification config (task: classification): train it with "
            "`deformable train --config ...`, which reads the task"
        )
    return config_from_dict(values, kind)


def dump_config(config: TrainConfig | ClassifierConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: an interrupted write leaves the old file or none)."""
    if not isinstance(config, TrainConfig | ClassifierConfig):
        raise TypeError(f"config must be a TrainConfig or ClassifierConfig, got {type(config).__name__}")
    if Path(path).is_dir():
        raise ValueError(f"path must be a file to write the config to, got the folder {path}")
    atomic_write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), path)
