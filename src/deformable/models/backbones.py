"""ResNet / ResNeXt backbones with deformable convolutions in chosen stages.

Built on torchvision's ResNet, so torchvision's ImageNet weights load unchanged (the deformable layers
keep the convolution's ``weight``/``bias`` names and add a zero-initialised ``conv_offset``). Stages
follow the paper's naming: conv2..conv5 are torchvision's ``layer1``..``layer4``. DCN replaces every
3x3 convolution of the chosen stages: 13 layers in ResNet-50 for conv3-conv5 (4 + 6 + 3 blocks).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import torch
import torchvision
from torch import nn
from torchvision.models import ResNet
from torchvision.models.resnet import Bottleneck

from ..nn import DCNv1, DCNv2
from ..nn.deform_conv import _positive_int

DCNVersion = Literal["v1", "v2"] | None
_STAGE_TO_LAYER = {2: "layer1", 3: "layer2", 4: "layer3", 5: "layer4"}
_LAYERS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "resnext50_32x4d": "ResNeXt50_32X4D_Weights",
    "resnext101_32x8d": "ResNeXt101_32X8D_Weights",
}


def check_dcn_stages(dcn_stages: Iterable[int], name: str = "dcn_stages") -> tuple[int, ...]:
    """``dcn_stages`` sorted, after checking they are distinct stages among 2-5 (conv2..conv5); the
    ValueError otherwise names the value as ``name``."""
    if isinstance(dcn_stages, str) or not isinstance(dcn_stages, Iterable):
        raise ValueError(
            f"{name} must be a sequence of stages among 2, 3, 4, 5 (conv2..conv5), got {dcn_stages!r}"
        )
    stages = tuple(dcn_stages)
    if not all(isinstance(s, int) and s in _STAGE_TO_LAYER for s in stages) or len(set(stages)) != len(
        stages
    ):
        raise ValueError(f"{name} must be distinct stages among 2, 3, 4, 5 (conv2..conv5), got {stages!r}")
    return tuple(sorted(stages))


def check_module(model, name: str = "model") -> None:
    """TypeError naming ``name`` unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")


def check_norm_layer(norm_layer) -> None:
    """TypeError unless ``norm_layer`` is None or a factory ``channels -> nn.Module`` (a class such as
    ``nn.BatchNorm2d`` or a function, not a name or a module instance)."""
    if norm_layer is not None and (isinstance(norm_layer, nn.Module) or not callable(norm_layer)):
        raise TypeError(
            "norm_layer must be None or a callable taking a channel count and returning a module "
            f"(e.g. nn.BatchNorm2d), got {norm_layer!r}"
        )


def _dcn_class(dcn: DCNVersion):
    if dcn not in ("v1", "v2", None):
        raise ValueError(f"dcn must be 'v1', 'v2' or None, got {dcn!r}")
    return {"v1": DCNv1, "v2": DCNv2, None: None}[dcn]


def convert_resnet_to_dcn(
    model: ResNet,
    dcn: DCNVersion = "v2",
    dcn_stages: Iterable[int] = (3, 4, 5),
    offset_groups: int = 1,
    **layer_kwargs,
) -> ResNet:
    """Replace, in place, every 3x3 convolution of the chosen stages by a DCN layer keeping its weights.

    Args:
        model: a torchvision ResNet (or any module with ``layer1``..``layer4``).
        dcn: "v2" (modulated, :class:`~deformable.nn.DCNv2`), "v1" or None (no change).
        dcn_stages: paper stages 2-5 (conv2..conv5).
        offset_groups: offset groups of every DCN layer.
        layer_kwargs: further DCN layer arguments (``mask_scale``, ``backend``, ...).

    Returns:
        ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a ResNet (an nn.Module with layer1..layer4), got {type(model).__name__}"
        )
    cls = _dcn_class(dcn)
    stages = check_dcn_stages(dcn_stages)
    if cls is None:
        return model
    missing = [
        _STAGE_TO_LAYER[s]
        for s in stages
        if not isinstance(getattr(model, _STAGE_TO_LAYER[s], None), nn.Module)
    ]
    if missing:
        raise ValueError(
            f"model must be a ResNet with layer1..layer4; {type(model).__name__} has no {missing}"
        )
    for stage in stages:
        layer = getattr(model, _STAGE_TO_LAYER[stage])
        for block in layer:
            for name, child in list(block.named_children()):
                if type(child) is nn.Conv2d and child.kernel_size == (3, 3):
                    setattr(block, name, cls.from_conv2d(child, offset_groups=offset_groups, **layer_kwargs))
    return model


def count_dcn_layers(model: nn.Module) -> int:
    """Number of DCNv1/DCNv2 layers in ``model``."""
    check_module(model)
    return sum(isinstance(m, DCNv1 | DCNv2) for m in model.modules())


def _load_torchvision_weights(arch: str, model: ResNet, weights, progress: bool) -> None:
    """Load ``weights`` (a local file, a torchvision Weights enum or its name) into a plain ResNet."""
    if isinstance(weights, str | Path) and Path(weights).suffix in (".pth", ".pt", ".safetensors"):
        from .checkpoint import read_state_dict

        state = read_state_dict(weights)
    else:
        enum = getattr(torchvision.models, _LAYERS[arch])
        if isinstance(weights, str):
            try:
                weights = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
            except KeyError:
                choices = list(dict.fromkeys(["DEFAULT", *enum.__members__]))  # DEFAULT is an alias
                raise ValueError(
                    f"weights must be a .pth/.safetensors path or one of {choices}, got {weights!r}"
                ) from None
        if not isinstance(weights, enum):
            raise TypeError(f"weights must be a path, a {enum.__name__} or its name, got {weights!r}")
        state = weights.get_state_dict(progress=progress)  # downloads only when the user asked for it
    # Shapes first: load_state_dict raises a RuntimeError on them, after naming the keys it would load.
    target = model.state_dict()
    mismatched = [
        f"{key} {tuple(value.shape)} (model: {tuple(target[key].shape)})"
        for key, value in state.items()
        if key in target and isinstance(value, torch.Tensor) and value.shape != target[key].shape
    ]
    if mismatched:
        raise ValueError(
            f"weights do not fit {arch} with num_classes={getattr(model.fc, 'out_features', '?')}: "
            f"{len(mismatched)} tensor(s) of another shape, e.g. {mismatched[:3]}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit {arch}: missing {sorted(missing)[:5]}..., "
            f"unexpected {sorted(unexpected)[:5]}..."
        )


def _layer_options(cls: type) -> set[str]:
    """The keyword-only arguments of a DCN layer class (its own and its bases') that
    :func:`convert_resnet_to_dcn` leaves to the caller."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= {
                name
                for name, parameter in inspect.signature(init).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY
            }
    return names - {"offset_groups", "device", "dtype"}


def _build(
    arch: str,
    *,
    dcn: DCNVersion,
    dcn_stages: Iterable[int],
    offset_groups: int,
    replace_stride_with_dilation: list[bool] | None,
    weights,
    norm_layer: Callable[..., nn.Module] | None,
    progress: bool,
    layer_options: dict | None = None,
    **kwargs,
) -> ResNet:
    cls = _dcn_class(dcn)
    if layer_options is not None and not isinstance(layer_options, dict):
        raise TypeError(f"layer_options must be a dict or None, got {type(layer_options).__name__}")
    if layer_options and cls is not None:
        # What a layer takes beyond what the conversion sets itself (the replaced conv's shape, and
        # offset_groups, an argument of its own): a wrong key was a TypeError naming a private class.
        allowed = _layer_options(cls)
        unknown = sorted(set(layer_options) - allowed)
        if unknown:
            hint = " (offset_groups is an argument of its own)" if "offset_groups" in unknown else ""
            raise ValueError(f"layer_options takes {sorted(allowed)} for dcn={dcn!r}, got {unknown}{hint}")
    if replace_stride_with_dilation is not None and any(replace_stride_with_dilation) and arch in (
        "resnet18", "resnet34"
    ):  # fmt: skip
        raise ValueError(
            f"replace_stride_with_dilation needs a bottleneck ResNet; {arch}'s basic blocks cannot dilate, "
            f"got {replace_stride_with_dilation!r}"
        )
    stages = check_dcn_stages(dcn_stages)
    check_norm_layer(norm_layer)
    if "num_classes" in kwargs:
        _positive_int(kwargs["num_classes"], "num_classes")
    if offset_groups is not None:
        _positive_int(offset_groups, "offset_groups")
    if replace_stride_with_dilation is not None and (
        isinstance(replace_stride_with_dilation, str)
        or len(replace_stride_with_dilation) != 3
        or not all(isinstance(v, bool) for v in replace_stride_with_dilation)
    ):
        raise ValueError(
            "replace_stride_with_dilation must be 3 bools (conv3..conv5), "
            f"got {replace_stride_with_dilation!r}"
        )
    model = getattr(torchvision.models, arch)(
        weights=None,
        replace_stride_with_dilation=replace_stride_with_dilation,
        norm_layer=norm_layer,
        **kwargs,
    )
    if weights is not None:
        _load_torchvision_weights(arch, model, weights, progress)
    if cls is not None:
        convert_resnet_to_dcn(model, dcn, stages, offset_groups, **(layer_options or {}))
    return model


def _make_builder(arch: str):
    def builder(
        *,
        dcn: DCNVersion = "v2",
        dcn_stages: Iterable[int] = (3, 4, 5),
        offset_groups: int = 1,
        replace_stride_with_dilation: list[bool] | None = None,
        weights=None,
        norm_layer: Callable[..., nn.Module] | None = None,
        progress: bool = True,
        layer_options: dict | None = None,
        **kwargs,
    ) -> ResNet:
        return _build(
            arch,
            dcn=dcn,
            dcn_stages=dcn_stages,
            offset_groups=offset_groups,
            replace_stride_with_dilation=replace_stride_with_dilation,
            weights=weights,
            norm_layer=norm_layer,
            progress=progress,
            layer_options=layer_options,
            **kwargs,
        )

    builder.__name__ = builder.__qualname__ = f"{arch}_dcn"
    builder.__doc__ = f"""torchvision's ``{arch}`` with deformable convolutions in ``dcn_stages``.

    Args:
        dcn: "v2" (modulated deformable convolution), "v1" or None (the plain network).
        dcn_stages: paper stages among 2-5 (conv2..conv5 = layer1..layer4); default conv3-conv5.
        offset_groups: offset groups of every DCN layer.
        replace_stride_with_dilation: as torchvision's (e.g. ``[False, False, True]`` dilates conv5).
        weights: ImageNet weights: a local ``.pth``/``.safetensors`` file, or torchvision's weights
            enum (or its name, e.g. "IMAGENET1K_V1"), which torchvision downloads on request.
        layer_options: further arguments of every DCN layer, e.g. ``{{"mask_scale": 2.0}}`` (DCNv2) or
            ``{{"backend": "aten"}}``.
        norm_layer, progress, kwargs: passed to torchvision's builder.

    Returns:
        A torchvision ``ResNet``; input [N, 3, H, W] -> logits [N, num_classes].
    """
    return builder


resnet18_dcn = _make_builder("resnet18")
resnet34_dcn = _make_builder("resnet34")
resnet50_dcn = _make_builder("resnet50")
resnet101_dcn = _make_builder("resnet101")
resnext50_32x4d_dcn = _make_builder("resnext50_32x4d")
resnext101_32x8d_dcn = _make_builder("resnext101_32x8d")

BACKBONES = {
    "resnet18": resnet18_dcn,
    "resnet34": resnet34_dcn,
    "resnet50": resnet50_dcn,
    "resnet101": resnet101_dcn,
    "resnext50_32x4d": resnext50_32x4d_dcn,
    "resnext101_32x8d": resnext101_32x8d_dcn,
}


def move_stride_to_1x1(model: nn.Module) -> nn.Module:
    """Give a bottleneck ResNet the MSRA layout, in place: every block that strides (the first of
    conv3-conv5) does so in its 1x1 ``conv1`` instead of torchvision's 3x3 ``conv2`` (whose offset
    branch follows it).

    detectron2 builds this layout (``MODEL.RESNETS.STRIDE_IN_1X1``, True by default, the layout of its
    MSRA-initialised ResNet-50/101, including its DCN configs). Its weights have the same shapes either
    way, so a checkpoint loads into either layout without complaint, but computes something else in the
    wrong one: call this on the model before loading such a checkpoint. Blocks that do not stride (a
    dilated conv5) are left alone.

    Args:
        model: a module holding torchvision ``Bottleneck`` blocks: a ResNet-50/101 or ResNeXt, or a
            detector built on one.

    Returns:
        ``model``.
    """
    check_module(model)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    if not blocks:
        raise ValueError(
            "model must hold bottleneck blocks (ResNet-50/101, ResNeXt): the stride moves to their 1x1 "
            f"convolution, and {type(model).__name__} has none"
        )
    for block in blocks:
        stride = tuple(block.conv2.stride)
        if stride == (1, 1):
            continue
        block.conv1.stride = stride
        block.conv2.stride = (1, 1)
        offset_branch = getattr(block.conv2, "conv_offset", None)
        if isinstance(offset_branch, nn.Conv2d):
            offset_branch.stride = (1, 1)
    return model


@torch.no_grad()
def freeze_offsets_to_identity(model: nn.Module) -> nn.Module:
    """Zero every offset branch and fix DCNv2 masks at 1 (``mask_scale=2`` x sigmoid(0)).

    Its deformable convolutions then compute exactly their plain convolutions, so a backbone equals
    its plain counterpart; used by tests and to check converted checkpoints. Deformable RoI pooling
    (a detector's ``roi_pool="mdpool"``/``"dpool"`` heads) is left as it is.
    """
    check_module(model)
    for module in model.modules():
        if isinstance(module, DCNv1 | DCNv2):
            module.conv_offset.weight.zero_()
            if module.conv_offset.bias is not None:
                module.conv_offset.bias.zero_()
            if isinstance(module, DCNv2):
                module.mask_scale = 2.0
    return model
