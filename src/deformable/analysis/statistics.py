"""Statistics of nodes' spatial support over many images, by object size (COCO areas) and background.

For every image with its object boxes, :func:`support_statistics` analyses one foreground node per box
(the position of ``layer``'s output map nearest the box centre, or the box itself as a RoI node) and
``backgrounds_per_image`` background nodes (positions whose centre lies in no box, drawn at random), and
records each node's ERF spread (radius of gyration, :func:`~.receptive_field.erf_spread`) and, optionally,
its error-bounded saliency area. It also measures DCNv1's effective dilation of every deformable layer at
every output position, assigned to the category of the smallest box containing the position's centre
(background if none). Categories follow COCO: small (area < 32^2), medium (< 96^2), large, background.
Boxes ``(x1, y1, x2, y2)`` follow torchvision's convention (pixel ``j`` spans ``[j, j + 1)``); they are
compared with positions' image centres in pixel-centre coordinates (box coordinate minus 0.5).
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._core import ROI, analysis_mode, layer_output, prepare_image
from .geometry import layer_geometry
from .receptive_field import effective_receptive_field, erf_spread
from .saliency import saliency_region
from .sampling import effective_dilation, sampling_layers

__all__ = [
    "CATEGORIES",
    "COCO_AREA_RANGES",
    "NodeRecord",
    "SupportStatistics",
    "size_category",
    "support_statistics",
]

#: COCO's object size classes by box area (pixels^2): [low, high).
COCO_AREA_RANGES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, math.inf)}
CATEGORIES = ("small", "medium", "large", "background")


def size_category(area: float) -> str:
    """COCO size class of a box area (pixels^2): ``"small"``, ``"medium"`` or ``"large"``."""
    if isinstance(area, bool) or not isinstance(area, numbers.Real):
        raise TypeError(f"area must be a non-negative number, got {area!r}")
    for name, (low, high) in COCO_AREA_RANGES.items():
        if low <= area < high:
            return name
    raise ValueError(f"area must be a non-negative number, got {area!r}")


@dataclass
class NodeRecord:
    """One analysed node: image index, category, the node, ERF spread (image px) and saliency (or NaN)."""

    image_index: int
    category: str
    layer: str
    position: tuple
    erf_spread: float
    saliency_area_fraction: float = math.nan
    saliency_area_pixels: float = math.nan
    saliency_error: float = math.nan


@dataclass
class SupportStatistics:
    """Per-node records and per-layer effective dilation sums; summaries by category.

    Attributes:
        nodes: the :class:`NodeRecord` of every analysed node.
        dilation_sums: ``{layer: {category: (sum of effective dilations, positions)}}`` (input-map px).
    """

    nodes: list[NodeRecord] = field(default_factory=list)
    dilation_sums: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, float]]:
        """``{category: {"nodes", "erf_spread", "saliency_area_fraction", "saliency_area_pixels"}}``:
        means over the nodes of each category (NaN where none or not measured)."""
        result = {}
        for category in CATEGORIES:
            records = [r for r in self.nodes if r.category == category]
            row: dict[str, float] = {"nodes": float(len(records))}
            for key in ("erf_spread", "saliency_area_fraction", "saliency_area_pixels"):
                values = [getattr(r, key) for r in records if not math.isnan(getattr(r, key))]
                row[key] = sum(values) / len(values) if values else math.nan
            result[category] = row
        return result

    def effective_dilation(self) -> dict[str, dict[str, float]]:
        """``{layer: {category: mean effective dilation}}`` in input-map pixels (NaN without positions)."""
        return {
            layer: {
                c: (s / n if n else math.nan)
                for c, (s, n) in ((c, sums.get(c, (0.0, 0))) for c in CATEGORIES)
            }
            for layer, sums in self.dilation_sums.items()
        }

    def to_markdown(self) -> str:
        """Both tables in Markdown."""
        lines = [
            "| category | nodes | ERF spread (px) | saliency area (%) | saliency area (px) |",
            "|---|---|---|---|---|",
        ]
        for category, row in self.summary().items():
            lines.append(
                f"| {category} | {int(row['nodes'])} | {row['erf_spread']:.1f} | "
                f"{100 * row['saliency_area_fraction']:.1f} | {row['saliency_area_pixels']:.0f} |"
            )
        dilation = self.effective_dilation()
        if dilation:
            lines += ["", "| layer | " + " | ".join(CATEGORIES) + " |", "|---|" + "---|" * len(CATEGORIES)]
            for layer, row in dilation.items():
                lines.append(f"| {layer} | " + " | ".join(f"{row[c]:.2f}" for c in CATEGORIES) + " |")
        return "\n".join(lines)


def _boxes(boxes, name: str = "boxes") -> Tensor:
    """``boxes`` as a float64 ``[M, 4]`` tensor (one box ``[4]`` and no boxes ``[]`` are accepted)."""
    try:
        boxes = torch.as_tensor(boxes, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{name} must be [M, 4] numbers (x1, y1, x2, y2), got {type(boxes).__name__}"
        ) from None
    if boxes.dim() == 1 and boxes.numel() in (0, 4):
        boxes = boxes.reshape(-1, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape [M, 4] (x1, y1, x2, y2), got {list(boxes.shape)}")
    if not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"{name} must be finite, got {boxes.tolist()}")
    if bool(((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any()):
        raise ValueError(f"{name} must be (x1, y1, x2, y2) with x2 > x1 and y2 > y1")
    return boxes


def _sample(index: int, sample) -> tuple[Tensor, Tensor, list]:
    """``(image, boxes [M, 4], labels [M])`` of ``samples[index]`` (labels None when not given)."""
    name = f"samples[{index}]"
    if isinstance(sample, str) or not isinstance(sample, Sequence) or len(sample) not in (2, 3):
        raise TypeError(
            f"{name} must be (image, boxes) or (image, boxes, labels), got {type(sample).__name__}"
        )
    boxes = _boxes(sample[1], f"{name} boxes")
    if len(sample) < 3 or sample[2] is None:
        return sample[0], boxes, [None] * boxes.shape[0]
    labels = sample[2].tolist() if isinstance(sample[2], Tensor) else list(sample[2])
    if len(labels) != boxes.shape[0]:
        raise ValueError(f"{name} labels must give one class per box ({boxes.shape[0]}), got {len(labels)}")
    return sample[0], boxes, labels


def _categorise(points: Tensor, boxes: Tensor) -> list[str]:
    """Category of each image point ``[P, 2]`` (y, x), pixel-centre coordinates: the smallest box
    ``(x1, y1, x2, y2)`` (box convention: pixel ``j`` spans ``[j, j + 1)``) containing it, else background."""
    if boxes.numel() == 0:
        return ["background"] * points.shape[0]
    y, x = points[:, 0:1].double() + 0.5, points[:, 1:2].double() + 0.5  # in box coordinates
    inside = (x >= boxes[:, 0]) & (x <= boxes[:, 2]) & (y >= boxes[:, 1]) & (y <= boxes[:, 3])  # [P, M]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    masked = torch.where(inside, areas[None], torch.full_like(inside, math.inf, dtype=areas.dtype))
    smallest, index = masked.min(1)
    return [
        "background" if math.isinf(float(s)) else size_category(float(areas[i]))
        for s, i in zip(smallest, index, strict=True)
    ]


def support_statistics(
    model: nn.Module,
    samples: Iterable[Sequence],
    layer: str,
    *,
    channel: int | None = None,
    backgrounds_per_image: int = 1,
    saliency: bool = True,
    error_bound: float = 0.1,
    fill="mean",
    block_size: int | None = None,
    dilation: bool = True,
    dilation_layers: str | Sequence[str] | None = "deformable",
    roi: bool = False,
    generator: torch.Generator | None = None,
) -> SupportStatistics:
    """ERF spread, saliency area and effective dilation by object size and for background.

    Args:
        model: the network or detector.
        samples: ``(image [C, H, W], boxes [M, 4])`` or ``(image, boxes, labels [M])`` items; boxes are
            ``(x1, y1, x2, y2)`` image pixels; labels (RoI nodes) are class indices.
        layer: the layer whose output positions are the nodes (ignored with ``roi=True``).
        channel: the nodes' channel (None: sum over channels).
        backgrounds_per_image: background nodes drawn per image (positions, or for RoI nodes boxes of
            side ``min(H, W) / 4`` centred there, whose centre lies in no box).
        saliency: also search each node's saliency region (the expensive part).
        error_bound, fill, block_size: passed to :func:`~.saliency.saliency_region`.
        dilation: measure the effective dilation of ``dilation_layers`` (see
            :func:`~.sampling.sampling_layers`; skipped when the model has none of them).
        roi: analyse RoI nodes (detectors) instead of layer positions.
        generator: random generator for the background draws.

    Returns:
        :class:`SupportStatistics` (``summary()``, ``effective_dilation()``, ``to_markdown()``).
    """
    if isinstance(backgrounds_per_image, bool) or not isinstance(backgrounds_per_image, int):
        raise TypeError(f"backgrounds_per_image must be an int >= 0, got {backgrounds_per_image!r}")
    if backgrounds_per_image < 0:
        raise ValueError(f"backgrounds_per_image must be an int >= 0, got {backgrounds_per_image}")
    if not isinstance(samples, Iterable):
        raise TypeError(
            f"samples must be an iterable of (image, boxes[, labels]), got {type(samples).__name__}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if dilation:
        sampling_layers(model, dilation_layers)  # a bad selector is an error, not "no such layers"
    stats = SupportStatistics()
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for index, sample in enumerate(samples):
        image, boxes, labels = _sample(index, sample)
        x = prepare_image(image, model)
        height, width = x.shape[-2:]
        nodes = []
        if roi:
            for box, label in zip(boxes.tolist(), labels, strict=True):
                area = (box[2] - box[0]) * (box[3] - box[1])
                nodes.append((size_category(area), ROI, tuple(box), None if label is None else int(label)))
            side = min(height, width) / 4
            for y, x0 in _background_points(model, x, None, boxes, backgrounds_per_image, generator):
                cy, cx = y + 0.5, x0 + 0.5  # the pixel's centre in box coordinates
                box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
                nodes.append(("background", ROI, box, None))
        else:
            geometry = layer_geometry(model, x, layer)
            with torch.no_grad(), analysis_mode(model):
                map_h, map_w = layer_output(model, x[None], layer).shape[-2:]
            for box in boxes.tolist():
                cy, cx = (box[1] + box[3]) / 2 - 0.5, (box[0] + box[2]) / 2 - 0.5  # pixel-centre coordinates
                py = min(max(round(geometry.y.from_image(cy)), 0), map_h - 1)
                px = min(max(round(geometry.x.from_image(cx)), 0), map_w - 1)
                area = (box[2] - box[0]) * (box[3] - box[1])
                nodes.append((size_category(area), layer, (py, px), channel))
            for position in _background_points(model, x, layer, boxes, backgrounds_per_image, generator):
                nodes.append(("background", layer, position, channel))
        for category, node_layer, position, node_channel in nodes:
            erf = effective_receptive_field(model, x, node_layer, position, node_channel)
            record = NodeRecord(index, category, node_layer, position, erf_spread(erf))
            if saliency:
                result = saliency_region(
                    model,
                    x,
                    node_layer,
                    position,
                    node_channel,
                    error_bound,
                    fill,
                    block_size=block_size,
                    erf=erf,
                )
                record.saliency_area_fraction = result.area_fraction
                record.saliency_area_pixels = float(result.mask.sum())
                record.saliency_error = result.error
            stats.nodes.append(record)
        if dilation:
            try:
                maps = effective_dilation(model, x, dilation_layers)
            except ValueError:
                maps = {}
            for name, dmap in maps.items():
                categories = _categorise(dmap.centers.reshape(-1, 2).cpu(), boxes)
                values = dmap.dilation.reshape(-1).tolist()
                for category, value in zip(categories, values, strict=True):
                    entry = sums[name][category]
                    entry[0] += value
                    entry[1] += 1
    stats.dilation_sums = {
        name: {c: (float(s), int(n)) for c, (s, n) in cats.items()} for name, cats in sums.items()
    }
    return stats


def _background_points(model, x: Tensor, layer: str | None, boxes: Tensor, count: int, generator):
    """Up to ``count`` background nodes: layer positions (y, x), or image points (y, x) if ``layer`` is
    None, whose image centre lies in no box."""
    if count <= 0:
        return []
    height, width = x.shape[-2:]
    if layer is None:
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
        )
        candidates = torch.stack((ys, xs), -1).reshape(-1, 2)
        centres = candidates
    else:
        geometry = layer_geometry(model, x, layer)
        with torch.no_grad(), analysis_mode(model):
            map_h, map_w = layer_output(model, x[None], layer).shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(map_h), torch.arange(map_w), indexing="ij")
        candidates = torch.stack((ys, xs), -1).reshape(-1, 2)
        centres = torch.stack(
            (geometry.y.to_image(candidates[:, 0].double()), geometry.x.to_image(candidates[:, 1].double())),
            -1,
        )
        inside_image = (  # pixel-centre coordinates: the image spans [-0.5, size - 0.5)
            (centres[:, 0] >= -0.5)
            & (centres[:, 0] < height - 0.5)
            & (centres[:, 1] >= -0.5)
            & (centres[:, 1] < width - 0.5)
        )
        candidates, centres = candidates[inside_image], centres[inside_image]
    categories = _categorise(centres, boxes)
    keep = torch.tensor([c == "background" for c in categories], dtype=torch.bool)
    candidates = candidates[keep]
    if candidates.shape[0] == 0:
        return []
    order = torch.randperm(candidates.shape[0], generator=generator)[:count]
    return [tuple(v.item() if layer is None else int(v) for v in candidates[i]) for i in order]
