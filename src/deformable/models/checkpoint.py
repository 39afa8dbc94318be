"""Load checkpoints written by deformable, torchvision, mmdetection or detectron2.

Keys are renamed to torchvision's module names; class-specific detector heads are re-laid out
(mmdetection and detectron2 put the background class last and have no background regression or mask
rows; torchvision puts background first). DCN offset convolutions keep the operator's layout: both
mmcv's and detectron2's deformable layers chunk their 3-way offset-conv output as [offsets | mask],
which is exactly ours. Files are read with ``weights_only=True`` (``.pth``/``.pt``) or with
safetensors (``.safetensors``, needs the ``safetensors`` package).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from .._files import load_weights_only
from .backbones import check_module

Source = Literal["deformable", "torchvision", "mmdet", "detectron2"]
_IGNORABLE_MISSING = re.compile(r"(^|\.)num_batches_tracked$")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from ``.pth``/``.pt`` (weights only) or ``.safetensors``.

    Wrappers written by training frameworks (``{"model": ...}``, ``{"state_dict": ...}``) are unwrapped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read or holds no tensors; the message names the file.
    """
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        data = _read_safetensors(path)
    else:
        data = load_weights_only(path, "checkpoint file")
    return unwrap_state_dict(data, str(path))


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file; a ValueError naming the file if it cannot be read."""
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise ImportError(
            "reading .safetensors needs the 'safetensors' package: pip install safetensors"
        ) from error
    try:
        return dict(load_file(str(path)))
    except Exception as error:  # SafetensorError (corrupt header, truncated data) and kin
        raise ValueError(f"cannot read safetensors checkpoint {path}: {error}") from error


def unwrap_state_dict(data, what: str = "checkpoint") -> dict[str, Tensor]:
    """The tensors of a state dict, unwrapping ``model``/``state_dict`` entries.

    Raises:
        ValueError: ``data`` is no mapping or holds no tensors (``what`` names it in the message).
    """
    while isinstance(data, Mapping) and not any(isinstance(v, Tensor) for v in data.values()):
        for key in ("model", "state_dict", "model_state"):
            if key in data:
                data = data[key]
                break
        else:
            break
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{what} holds no state dict (expected a mapping of names to tensors, got {type(data).__name__})"
        )
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{what} holds no state dict (no tensors)")
    bad_keys = [k for k in tensors if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(
            f"{what} holds no state dict: its keys must be parameter names (str), got {bad_keys[:3]}"
        )
    return tensors


# ------------------------------------------------------------------------------------------------
# Renaming rules: (pattern, replacement) applied in order; the first match wins.

#: (key pattern, replacement): a ``re.sub`` template or a function of the match.
_Rule = tuple[str, str | Callable[[re.Match[str]], str]]

_MMDET_RULES: list[_Rule] = [
    (r"^backbone\.(.*)$", r"backbone.body.\1"),
    (r"^neck\.lateral_convs\.(\d+)\.conv\.(.*)$", r"backbone.fpn.inner_blocks.\1.0.\2"),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.(.*)$", r"backbone.fpn.layer_blocks.\1.0.\2"),
    (r"^rpn_head\.rpn_conv\.(.*)$", r"rpn.head.conv.0.0.\1"),
    (r"^rpn_head\.rpn_cls\.(.*)$", r"rpn.head.cls_logits.\1"),
    (r"^rpn_head\.rpn_reg\.(.*)$", r"rpn.head.bbox_pred.\1"),
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.(.*)$", r"roi_heads.box_head.fc6.\1"),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.(.*)$", r"roi_heads.box_head.fc7.\1"),
    (r"^roi_head\.bbox_head\.fc_cls\.(.*)$", r"roi_heads.box_predictor.cls_score.\1"),
    (r"^roi_head\.bbox_head\.fc_reg\.(.*)$", r"roi_heads.box_predictor.bbox_pred.\1"),
    (r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.(.*)$", r"roi_heads.mask_head.\1.0.\2"),
    (r"^roi_head\.mask_head\.upsample\.(.*)$", r"roi_heads.mask_predictor.conv5_mask.\1"),
    (r"^roi_head\.mask_head\.conv_logits\.(.*)$", r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
    (r"^roi_head\.bbox_roi_extractor\.roi_layers\.(\d+)\.(.*)$", r"roi_heads.box_roi_pool.pools.\1.\2"),
    (r"^roi_head\.mask_roi_extractor\.roi_layers\.(\d+)\.(.*)$", r"roi_heads.mask_roi_pool.pools.\1.\2"),
]


def _strides_in_3x3(model: nn.Module) -> bool:
    """Whether ``model`` has a bottleneck block that strides in its 3x3 ``conv2`` (torchvision's layout)."""
    return any(
        isinstance(m, Bottleneck) and tuple(m.conv2.stride) != (1, 1) and tuple(m.conv1.stride) == (1, 1)
        for m in model.modules()
    )


def _detectron2_block(match: re.Match) -> str:
    stage, block, rest = int(match[1]), match[2], match[3]
    rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", rest)
    rest = re.sub(r"^shortcut\.norm\.", "downsample.1.", rest)
    rest = re.sub(r"^shortcut\.", "downsample.0.", rest)
    rest = re.sub(r"^conv(\d)_offset\.", r"conv\1.conv_offset.", rest)
    return f"backbone.body.layer{stage - 1}.{block}.{rest}"


_DETECTRON2_RULES: list[_Rule] = [
    (r"^backbone\.bottom_up\.stem\.conv1\.norm\.(.*)$", r"backbone.body.bn1.\1"),
    (r"^backbone\.bottom_up\.stem\.conv1\.(.*)$", r"backbone.body.conv1.\1"),
    (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.(.*)$", _detectron2_block),
    (r"^backbone\.fpn_lateral(\d)\.(.*)$", lambda m: f"backbone.fpn.inner_blocks.{int(m[1]) - 2}.0.{m[2]}"),
    (r"^backbone\.fpn_output(\d)\.(.*)$", lambda m: f"backbone.fpn.layer_blocks.{int(m[1]) - 2}.0.{m[2]}"),
    (r"^proposal_generator\.rpn_head\.conv\.(.*)$", r"rpn.head.conv.0.0.\1"),
    (r"^proposal_generator\.rpn_head\.objectness_logits\.(.*)$", r"rpn.head.cls_logits.\1"),
    (r"^proposal_generator\.rpn_head\.anchor_deltas\.(.*)$", r"rpn.head.bbox_pred.\1"),
    (r"^roi_heads\.box_head\.fc1\.(.*)$", r"roi_heads.box_head.fc6.\1"),
    (r"^roi_heads\.box_head\.fc2\.(.*)$", r"roi_heads.box_head.fc7.\1"),
    (r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(.*)$", r"roi_heads.box_predictor.\1.\2"),
    (
        r"^roi_heads\.mask_head\.mask_fcn(\d)\.(.*)$",
        lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}",
    ),
    (r"^roi_heads\.mask_head\.deconv\.(.*)$", r"roi_heads.mask_predictor.conv5_mask.\1"),
    (r"^roi_heads\.mask_head\.predictor\.(.*)$", r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
]

# torchvision's own detection checkpoints from before its v2 heads (the published v1 COCO weights):
# torchvision renames these keys in the modules' _load_from_state_dict, which only runs for keys the
# model has, so they are renamed here. Keys matching neither pass unchanged.
_TORCHVISION_LEGACY_RULES: list[_Rule] = [
    (r"^(.*\.)?rpn\.head\.conv\.(weight|bias)$", r"\1rpn.head.conv.0.0.\2"),
    (
        r"^(.*\.)?roi_heads\.mask_head\.mask_fcn(\d)\.(weight|bias)$",
        lambda m: f"{m[1] or ''}roi_heads.mask_head.{int(m[2]) - 1}.0.{m[3]}",
    ),
]

_RULES: dict[str, list[_Rule]] = {
    "deformable": [],
    "torchvision": [],
    "mmdet": _MMDET_RULES,
    "detectron2": _DETECTRON2_RULES,
}


def _rename(key: str, rules: list[_Rule]) -> str | None:
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


_CLASS_HEADS = tuple(
    f"{head}.{param}"
    for head in ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_fcn_logits")
    for param in ("weight", "bias")
)


def _background_first(key: str, value: Tensor, target: Tensor) -> Tensor | None:
    """Re-lay out class-specific head rows from background-last/absent to torchvision's background-first."""
    rows = target.shape[0]
    if (
        key.endswith(("box_predictor.cls_score.weight", "box_predictor.cls_score.bias"))
        and value.shape[0] == rows
    ):
        return torch.cat([value[-1:], value[:-1]])
    if (
        key.endswith(("box_predictor.bbox_pred.weight", "box_predictor.bbox_pred.bias"))
        and value.shape[0] == rows - 4
    ):
        return torch.cat([value.new_zeros(4, *value.shape[1:]), value])
    if key.endswith(("mask_fcn_logits.weight", "mask_fcn_logits.bias")) and value.shape[0] == rows - 1:
        return torch.cat([value.new_zeros(1, *value.shape[1:]), value])
    return None


@dataclass
class LoadReport:
    """What happened to every key: loaded, missing from the checkpoint, unexpected, or shape mismatches."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"checkpoint ({self.source}): {len(self.loaded)} tensors loaded"]
        sections = [
            ("missing in checkpoint (kept as initialised)", [(k, "") for k in self.missing]),
            ("unexpected in checkpoint (ignored)", [(k, "") for k in self.unexpected]),
            (
                "shape mismatch (ignored)",
                [(k, f"checkpoint {a} vs model {b}") for k, a, b in self.mismatched],
            ),
        ]
        for title, rows in sections:
            if rows:
                lines.append(f"| {title} | |")
                lines.append("|---|---|")
                lines.extend(f"| {key} | {note} |" for key, note in rows)
        return "\n".join(lines)


def _align_prefix(keys: dict[str, Tensor], model_keys: set[str]) -> dict[str, Tensor]:
    """Add or strip a module prefix (``backbone.body.``) so that the names meet the model's."""
    best, best_hits = keys, sum(k in model_keys for k in keys)
    for strip in ("", "backbone.body.", "backbone.", "body.", "module."):
        for add in ("", "backbone.body.", "body."):
            if strip == add:
                continue
            moved = {(add + k[len(strip) :] if k.startswith(strip) else k): v for k, v in keys.items()}
            hits = sum(k in model_keys for k in moved)
            if hits > best_hits:
                best, best_hits = moved, hits
    return best


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | Path | Mapping[str, Tensor],
    source: Source = "deformable",
    *,
    strict: bool = False,
    verbose: bool = False,
) -> LoadReport:
    """Load a checkpoint into ``model``, renaming keys written by another framework.

    Args:
        model: a deformable backbone or detector (torchvision module names).
        path_or_state_dict: a ``.pth``/``.pt``/``.safetensors`` file or a state dict (possibly wrapped in
            ``{"model": ...}``/``{"state_dict": ...}``).
        source: who wrote it: "deformable", "torchvision", "mmdet" or "detectron2".
        strict: raise ``ValueError`` unless every model tensor was loaded and nothing was left over.
        verbose: print the report.

    Returns:
        A :class:`LoadReport` (its ``str`` is a readable table of missing and unexpected keys).
    """
    check_module(model)
    if not isinstance(source, str) or source not in _RULES:
        raise ValueError(f"source must be one of {sorted(_RULES)}, got {source!r}")
    if isinstance(path_or_state_dict, str | os.PathLike):
        state = read_state_dict(path_or_state_dict)
    elif isinstance(path_or_state_dict, Mapping):
        state = unwrap_state_dict(path_or_state_dict)
    else:
        raise TypeError(
            "path_or_state_dict must be a checkpoint path (str or os.PathLike) or a state dict (a mapping), "
            f"got {type(path_or_state_dict).__name__}"
        )
    target = model.state_dict()
    rules = _RULES[source]
    report = LoadReport(source)
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        if rules:
            new = _rename(key, rules)
        else:  # a model whose own keys have the old names (a custom head) keeps them
            new = key if key in target else (_rename(key, _TORCHVISION_LEGACY_RULES) or key)
        if new is None:
            report.unexpected.append(key)
        else:
            renamed[new] = value
    renamed = _align_prefix(renamed, set(target))
    accepted: dict[str, Tensor] = {}
    for key, value in renamed.items():
        if key not in target:
            report.unexpected.append(key)
            continue
        if source in ("mmdet", "detectron2") and key.endswith(_CLASS_HEADS):
            # Re-laid out whatever the shapes: a model built without the background class has
            # regression and mask rows of the checkpoint's shape, shifted by one class.
            relaid = _background_first(key, value, target[key])
            if relaid is None or relaid.shape != target[key].shape:
                report.mismatched.append((key, tuple(value.shape), tuple(target[key].shape)))
                continue
            value = relaid
        elif value.shape != target[key].shape:
            report.mismatched.append((key, tuple(value.shape), tuple(target[key].shape)))
            continue
        accepted[key] = value
    model.load_state_dict(accepted, strict=False)
    if source == "detectron2" and _strides_in_3x3(model):
        warnings.warn(
            "detectron2's MSRA-initialised ResNets (MODEL.RESNETS.STRIDE_IN_1X1, True by default, its DCN "
            "configs included) stride in each stage's first 1x1 convolution, this model in the 3x3 one: "
            "the weights load either way, but compute something else in the wrong layout. If the "
            "checkpoint was trained so, call deformable.models.move_stride_to_1x1(model) before loading. "
            "detectron2 also pools boxes with aligned=True (ROIAlignV2).",
            UserWarning,
            stacklevel=2,
        )
    report.loaded = sorted(accepted)
    report.missing = sorted(k for k in target if k not in accepted and not _IGNORABLE_MISSING.search(k))
    if verbose:
        print(report)
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise ValueError(f"checkpoint does not match the model exactly:\n{report}")
    return report
