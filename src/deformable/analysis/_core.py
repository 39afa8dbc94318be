"""Nodes and how to evaluate them: the machinery every analysis in this package shares.

A *node* is either

- one position of a layer's output map: ``layer`` is a name from ``model.named_modules()`` whose output
  is a tensor ``[N, C, H_l, W_l]``, ``position`` is ``(y, x)`` in that map and ``channel`` one channel
  or None (all channels). Its *response* is the feature vector ``output[:, :, y, x]`` ``[C]`` (or the one
  channel, ``[1]``); the scalar whose gradients the analyses take is the sum of that vector (or the
  channel); or
- the RoI head of a torchvision detector (Faster/Mask R-CNN) for one box: ``layer="roi"``, ``position``
  the box ``(x1, y1, x2, y2)`` in image pixels, ``channel`` a class index (None: the highest-scoring
  foreground class on the unmasked image). Its *response* is the 2fc output (``roi_heads.box_head``,
  ``[1024]``) and the scalar whose gradients the analyses take is the classification score (the logit of
  ``roi_heads.box_predictor.cls_score``) of that class, as in the DCNv2 paper.

Models are run as they expect their input: a batch ``model(images)`` ``[B, C, H, W]`` for ordinary
networks, a list ``model([image, ...])`` for torchvision's ``GeneralizedRCNN`` detectors (whose
``transform`` normalises and resizes; image coordinates are those of the image given). A layer node stops
the forward pass as soon as the layer has run.

Coordinates: image points ``(y, x)`` are pixel-centre coordinates (pixel ``(i, j)`` is centred on the
integer point ``(i, j)``); boxes ``(x1, y1, x2, y2)`` follow torchvision's convention, where pixel ``j``
spans ``[j, j + 1)``, so a box coordinate ``u`` is the pixel-centre coordinate ``u - 0.5``.

The analyses take gradients whatever the caller's autograd mode: they run under
:func:`gradients_enabled`, so they also work inside ``torch.no_grad()`` and ``torch.inference_mode()``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeGuard

import torch
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from ..models.backbones import check_module

#: ``layer`` value naming the RoI-head node of a detector.
ROI = "roi"
_ROI_ALIASES = (ROI, "roi_heads", "roi_heads.box_head")


@dataclass(frozen=True)
class Node:
    """One network node (see the module docstring).

    Attributes:
        layer: a module name, or ``"roi"`` for the RoI head of a detector.
        position: ``(y, x)`` in the layer's output map, or the box ``(x1, y1, x2, y2)`` for RoI nodes.
        channel: one output channel / class index, or None (all channels / best foreground class).
    """

    layer: str
    position: tuple
    channel: int | None = None

    @property
    def is_roi(self) -> bool:
        return self.layer in _ROI_ALIASES


def make_node(layer: str, position, channel: int | None = None) -> Node:
    """Validate ``(layer, position, channel)`` and return a :class:`Node`."""
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module name (str) or 'roi', got {type(layer).__name__}")
    if channel is not None and (
        isinstance(channel, bool) or not isinstance(channel, numbers.Integral) or channel < 0
    ):
        raise ValueError(f"channel must be a non-negative int or None, got {channel!r}")
    channel = None if channel is None else int(channel)
    if layer in _ROI_ALIASES:
        values = _values(position, "position")
        if len(values) != 4 or not all(_is_finite_real(v) for v in values):
            raise ValueError(f"a RoI node's position must be a box (x1, y1, x2, y2), got {position!r}")
        x1, y1, x2, y2 = (float(v) for v in values)
        if not (x2 > x1 and y2 > y1):
            raise ValueError(f"a RoI node's box must have x2 > x1 and y2 > y1, got {position!r}")
        return Node(ROI, (x1, y1, x2, y2), channel)
    return Node(layer, check_position(position), channel)


def _values(value, name: str) -> tuple:
    """``value`` (a sequence or a tensor) as a tuple, 0-d tensor elements as numbers; TypeError naming
    ``name`` otherwise."""
    if isinstance(value, Tensor):
        value = value.tolist()
    if not isinstance(value, str):
        with contextlib.suppress(TypeError):
            return tuple(v.item() if isinstance(v, Tensor) and v.dim() == 0 else v for v in value)
    raise TypeError(f"{name} must be a sequence of numbers, got {type(value).__name__}")


def _is_finite_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_position(
    position, layer: str | None = None, size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """``position`` as ``(y, x)`` ints; with ``size`` (height, width) of ``layer``'s output map, a
    ValueError unless the position lies in it."""
    values = _values(position, "position")
    if len(values) != 2 or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"position must be (y, x) ints in the layer's output map, got {position!r}")
    y, x = int(values[0]), int(values[1])
    if size is not None and not (0 <= y < size[0] and 0 <= x < size[1]):
        raise ValueError(
            f"position {(y, x)} is outside the output map of {layer!r} (height {size[0]}, width {size[1]}): "
            f"y must be in [0, {size[0] - 1}] and x in [0, {size[1] - 1}]"
        )
    return y, x


def check_point(point, name: str = "point") -> tuple[float, float]:
    """``point`` as ``(y, x)`` finite numbers (image pixel coordinates)."""
    values = _values(point, name)
    if len(values) != 2 or not all(_is_finite_real(v) for v in values):
        raise ValueError(f"{name} must be (y, x) finite numbers in image pixels, got {point!r}")
    return float(values[0]), float(values[1])


def is_detector(model: nn.Module) -> TypeGuard[GeneralizedRCNN]:
    """True for torchvision's two-stage detectors (Faster/Mask R-CNN and this library's subclasses)."""
    return isinstance(model, GeneralizedRCNN)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first floating parameter (CPU/float32 if none)."""
    check_module(model)
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def prepare_image(image: Tensor, model: nn.Module) -> Tensor:
    """``image`` [C, H, W] (or [1, C, H, W]) detached, on the model's device and dtype: [C, H, W]."""
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor [C, H, W], got {type(image).__name__}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3:
        raise ValueError(f"image must have shape [C, H, W], got {list(image.shape)}")
    device, dtype = model_device_dtype(model)
    image = image.detach().to(device=device, dtype=dtype)
    # An image created under torch.inference_mode() cannot enter autograd: a copy made outside can.
    return image.clone() if image.is_inference() and not torch.is_inference_mode_enabled() else image


@contextlib.contextmanager
def gradients_enabled() -> Iterator[None]:
    """Autograd on for the duration, even inside the caller's ``torch.no_grad()`` or
    ``torch.inference_mode()`` (both restored afterwards). Images must be prepared inside
    (:func:`prepare_image` copies an inference-mode image into a tensor autograd can use)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


@contextlib.contextmanager
def analysis_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode for the duration (every module's ``training`` flag is restored afterwards)."""
    check_module(model)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class _Stop(Exception):
    """Raised by the node's forward hook: the rest of the forward pass is not needed."""


def run_model(model: nn.Module, images: Tensor):
    """Run ``model`` on ``images`` [B, C, H, W] the way it expects its input."""
    if is_detector(model):
        return model(list(images.unbind(0)))
    return model(images)


def find_module(model: nn.Module, name: str) -> nn.Module:
    """``dict(model.named_modules())[name]`` with a helpful error."""
    check_module(model)
    if not isinstance(name, str):
        raise TypeError(f"layer must be a module name (str), got {type(name).__name__}")
    modules = dict(model.named_modules())
    if name not in modules:
        close = [n for n in modules if n and (name in n or n.endswith(name.rsplit(".", 1)[-1]))][:8]
        raise ValueError(f"layer {name!r} is not a module of the model; similar names: {close}")
    return modules[name]


def layer_output(model: nn.Module, images: Tensor, layer: str) -> Tensor:
    """The output ``[B, C, H_l, W_l]`` of module ``layer`` on ``images`` (its first call in the forward
    pass, which stops there)."""
    module = find_module(model, layer)
    captured: list[Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        run_model(model, images)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"layer {layer!r} did not run in the model's forward pass")
    output = captured[0]
    if not isinstance(output, Tensor) or output.dim() != 4:
        kind = type(output).__name__ if not isinstance(output, Tensor) else f"shape {list(output.shape)}"
        raise ValueError(
            f"layer {layer!r} must output a [N, C, H, W] tensor to define a node, got {kind}; "
            "pick a submodule (e.g. backbone.body.layer4 or backbone.fpn.layer_blocks.0)"
        )
    return output


@dataclass
class NodeOutput:
    """A node evaluated on a batch: ``scalar`` [B] (what gradients are taken of) and ``response`` [B, D]
    (what the saliency error compares). Layer nodes: the response is the feature vector at the position
    (D = C, or D = 1 for one channel) and the scalar its sum (or the channel); RoI nodes: the 2fc output
    (D = its width) and the class score."""

    scalar: Tensor
    response: Tensor


def _evaluate_layer(model: nn.Module, images: Tensor, node: Node) -> NodeOutput:
    output = layer_output(model, images, node.layer)
    _, channels, height, width = output.shape
    y, x = check_position(node.position, node.layer, (height, width))
    if node.channel is not None and node.channel >= channels:
        raise ValueError(f"channel {node.channel} is out of range: {node.layer!r} has {channels} channels")
    values = output[:, :, y, x]  # [B, C]
    if node.channel is None:
        return NodeOutput(values.sum(1), values)
    response = values[:, node.channel : node.channel + 1]  # [B, 1]
    return NodeOutput(response[:, 0], response)


def spatial_size(t: Tensor) -> tuple[int, int]:
    """``(height, width)``: the sizes of the last two dimensions of ``t``."""
    height, width = t.shape[-2:]
    return height, width


def _check_detector(model: nn.Module) -> GeneralizedRCNN:
    """``model``, checked to be a torchvision two-stage detector."""
    if not is_detector(model):
        raise ValueError(
            f"RoI nodes need a torchvision Faster/Mask R-CNN (GeneralizedRCNN), got {type(model).__name__}"
        )
    return model


def transformed_scale(model: GeneralizedRCNN, image_size: tuple[int, int]) -> tuple[float, float, tuple]:
    """For a detector, the resize ratios ``(r_y, r_x)`` of its transform (transformed / original size)
    for an image of ``image_size`` (height, width), and the transformed size."""
    probe = torch.zeros((3, *image_size), device=model_device_dtype(model)[0])
    with torch.no_grad():
        image_list, _ = model.transform([probe])
    h, w = image_list.image_sizes[0]
    return h / image_size[0], w / image_size[1], (h, w)


class RoIForward:
    """The RoI-head computation of a detector for one box, with optional hooks on the pooling.

    ``__call__(images)`` runs transform -> backbone -> ``box_roi_pool`` -> ``box_head`` -> class logits
    for the same box on every image of the batch and returns ``(features_2fc [B, D], logits [B, K],
    pooled [B, C, ph, pw])``. ``pooled_hook(pooled)`` may replace the pooled features (probes).
    """

    def __init__(self, model: nn.Module, box: Sequence[float]):
        self.model = _check_detector(model)
        self.box = tuple(float(v) for v in box)
        self.pooled_hook: Callable[[Tensor], Tensor] | None = None
        self.last_image_sizes: list[tuple[int, int]] | None = None
        self.last_boxes: list[Tensor] | None = None

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        model = self.model
        height, width = images.shape[-2:]
        image_list, _ = model.transform(list(images.unbind(0)))
        features = model.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        box = torch.tensor(self.box, device=images.device, dtype=images.dtype)
        boxes = []
        for h, w in image_list.image_sizes:
            ratio = torch.tensor([w / width, h / height, w / width, h / height], device=box.device)
            boxes.append((box * ratio.to(box.dtype))[None])
        self.last_image_sizes, self.last_boxes = list(image_list.image_sizes), boxes
        pooled = model.roi_heads.box_roi_pool(features, boxes, image_list.image_sizes)
        if self.pooled_hook is not None:
            pooled = self.pooled_hook(pooled)
        feats = model.roi_heads.box_head(pooled)
        logits, _ = model.roi_heads.box_predictor(feats)
        return feats.flatten(1), logits, pooled


def resolve_node(model: nn.Module, image: Tensor, node: Node) -> Node:
    """Fix what depends on the image: a RoI node's class when ``channel`` is None (the best foreground
    class on ``image`` [C, H, W]). Other nodes are returned unchanged."""
    if not node.is_roi or node.channel is not None:
        return node
    with torch.no_grad():
        _, logits, _ = RoIForward(model, node.position)(image[None])
    if logits.shape[1] < 2:
        return Node(node.layer, node.position, 0)
    return Node(node.layer, node.position, int(logits[0, 1:].argmax()) + 1)


def evaluate_node(model: nn.Module, images: Tensor, node: Node, roi: RoIForward | None = None) -> NodeOutput:
    """The node on every image of ``images`` [B, C, H, W]; differentiable. RoI nodes must be resolved
    (:func:`resolve_node`) so that the class is fixed."""
    if not node.is_roi:
        return _evaluate_layer(model, images, node)
    roi = roi if roi is not None else RoIForward(model, node.position)
    feats, logits, _ = roi(images)
    if node.channel is None or node.channel >= logits.shape[1]:
        raise ValueError(f"class {node.channel} is out of range: the detector has {logits.shape[1]} classes")
    return NodeOutput(logits[:, node.channel], feats)
