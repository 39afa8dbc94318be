"""The paper's Figure 1/2 layout: the three views of a node's support, side by side for several models.

Rows are models (e.g. regular, DCNv1, DCNv2); for every node (e.g. one on an object, one on the
background, or a RoI) three columns: the effective receptive field (heat map over the image), the
effective sampling / bin locations (points coloured and sized by weight; the node in green) and the
error-bounded saliency region (kept pixels bright, the rest dimmed). Drawn with matplotlib's Agg canvas
(no pyplot, no global backend change).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.backbones import check_module
from ._core import analysis_mode, make_node, prepare_image, resolve_node
from .geometry import position_to_image
from .receptive_field import effective_receptive_field
from .saliency import saliency_region
from .sampling import DEFORMABLE_TYPES, effective_sampling_locations

__all__ = ["FigureNode", "plot_support_figure"]


@dataclass(frozen=True)
class FigureNode:
    """A node to draw: a column label and the node (``layer``, ``position``, ``channel``; see
    :mod:`deformable.analysis`). The same node is analysed in every model, so the layer name must exist
    in all of them (module names agree between a ResNet and its DCN conversion)."""

    label: str
    layer: str
    position: tuple
    channel: int | None = None


def _matplotlib():
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from error
    return Figure, FigureCanvasAgg, Rectangle, colormaps


def _display(image: Tensor):
    """``[C, H, W]`` -> an ``[H, W, 3]`` float array in [0, 1] (min-max scaled) for imshow."""
    image = image.detach().float().cpu()
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    image = image[:3]
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else torch.zeros_like(image)
    return image.permute(1, 2, 0).numpy()


def _heat_overlay(erf: Tensor, colormap):
    """An ``[H, W, 4]`` RGBA overlay of ``|erf|`` normalised to its maximum; the opacity grows with the
    value (square root), so that the image shows through where the field is weak."""
    heat = erf.detach().abs().float().cpu()
    heat = heat / heat.max() if heat.max() > 0 else heat
    rgba = colormap(heat.numpy())
    rgba[..., 3] = 0.85 * heat.sqrt().numpy()
    return rgba


def _models(models) -> list[tuple[str, nn.Module]]:
    if isinstance(models, Mapping):
        items = list(models.items())
    elif isinstance(models, Sequence) and not isinstance(models, str):
        items = list(models)
        for index, item in enumerate(items):
            if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2:
                raise TypeError(f"models[{index}] must be a (label, model) pair, got {type(item).__name__}")
    else:
        raise TypeError(
            f"models must be a mapping {{label: model}} or a list of (label, model) pairs, got "
            f"{type(models).__name__}"
        )
    if not items:
        raise ValueError("models must name at least one model")
    for label, model in items:
        check_module(model, f"model {label!r}")
    return [(str(label), model) for label, model in items]


def _sampling_names(models: list[tuple[str, nn.Module]]) -> list[str]:
    """The deformable layers' names over all models (where models share module names)."""
    names: list[str] = []
    for _, model in models:
        for name, module in model.named_modules():
            if isinstance(module, DEFORMABLE_TYPES) and name not in names:
                names.append(name)
    return names


def _layers_for(model: nn.Module, names: list[str]) -> list[str] | None:
    """The shared sampling-layer names present in ``model`` as deformable layers or ``nn.Conv2d``
    (None, i.e. the default choice, when there are none)."""
    modules = dict(model.named_modules())
    present = [
        n
        for n in names
        if n in modules and (isinstance(modules[n], DEFORMABLE_TYPES) or type(modules[n]) is nn.Conv2d)
    ]
    return present or None


def plot_support_figure(
    models: Mapping[str, nn.Module] | Sequence[tuple[str, nn.Module]],
    image: Tensor,
    nodes: Sequence[FigureNode],
    out: str | os.PathLike,
    *,
    display_image: Tensor | None = None,
    weighting: str = "location",
    layers: str | Sequence[str] | None = "shared",
    saliency: bool = True,
    error_bound: float = 0.1,
    fill="mean",
    block_size: int | None = None,
    max_points: int = 2000,
    panel_size: float = 2.2,
    dpi: int = 100,
    title: str | None = None,
) -> Path:
    """Draw the three views (ERF, effective sampling locations, saliency) of ``nodes`` for ``models``.

    Args:
        models: ``{row label: model}`` (or a list of pairs), e.g. regular, DCNv1, DCNv2.
        image: ``[C, H, W]`` as the models take it.
        nodes: the :class:`FigureNode` columns (e.g. a foreground and a background node).
        out: the PNG to write (parent folders are created; written to a temporary file, then renamed).
        display_image: what to draw under the overlays (default ``image``, min-max scaled), e.g. the
            unnormalised image when ``image`` is normalised.
        weighting: sampling-location weighting: ``"location"`` (default, the gradient with respect to
            the sampling location, per image pixel), ``"value"`` or ``"contribution"`` (see :mod:`.sampling`).
        layers: sampling layers: ``"shared"`` (default) = the deformable layers' names found in any of
            the models, taken in each model whether deformable or regular (so a plain network shows its
            fixed grid at the same places); otherwise passed to
            :func:`~.sampling.effective_sampling_locations`. RoI nodes show their bins.
        saliency: search the saliency regions (the slow part); False leaves that column empty.
        error_bound, fill, block_size: passed to :func:`~.saliency.saliency_region`.
        max_points: largest-weight sampling points drawn per panel.
        panel_size: inches per panel; ``dpi``: resolution; ``title``: figure title.

    Returns:
        The path written.
    """
    Figure, FigureCanvasAgg, Rectangle, colormaps = _matplotlib()
    rows = _models(models)
    if not isinstance(nodes, Sequence) or not all(isinstance(n, FigureNode) for n in nodes):
        raise TypeError(f"nodes must be a list of FigureNode, got {nodes!r}")
    if not nodes:
        raise ValueError("nodes must hold at least one FigureNode")
    shown = prepare_image(image, rows[0][1])  # [C, H, W], checked
    size = shown.shape[-2:]
    if display_image is not None:
        if not isinstance(display_image, Tensor):
            raise TypeError(
                f"display_image must be a [C, H, W] tensor or None, got {type(display_image).__name__}"
            )
        if display_image.dim() != 3 or display_image.shape[-2:] != size:
            raise ValueError(
                f"display_image must be [C, {size[0]}, {size[1]}] (the image's size), got "
                f"{list(display_image.shape)}"
            )
    shared = _sampling_names(rows) if layers == "shared" else None
    background = _display(display_image if display_image is not None else shown)
    height, width = background.shape[:2]
    columns = 3 * len(nodes)
    figure = Figure(figsize=(panel_size * columns, panel_size * len(rows) + (0.4 if title else 0)), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for r, (label, model) in enumerate(rows):
        model_layers = _layers_for(model, shared) if shared is not None else layers
        for n, spec in enumerate(nodes):
            node = make_node(spec.layer, spec.position, spec.channel)
            with analysis_mode(model):
                node = resolve_node(model, prepare_image(image, model), node)
            erf = effective_receptive_field(model, image, node.layer, node.position, node.channel)
            points, weights = effective_sampling_locations(
                model, image, node.layer, node.position, node.channel,
                layers=None if node.is_roi else model_layers, weighting=weighting, max_points=max_points,
            )  # fmt: skip
            ax_erf, ax_points, ax_saliency = axes[r, 3 * n : 3 * n + 3]
            for ax in (ax_erf, ax_points, ax_saliency):
                ax.imshow(background.mean(-1), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_xlim(-0.5, width - 0.5)
                ax.set_ylim(height - 0.5, -0.5)
            ax_erf.imshow(_heat_overlay(erf, colormaps["jet"]))
            if weights.numel():
                w = weights.detach().float().cpu()
                order = torch.argsort(w)
                w, p = w[order], points.detach().float().cpu()[order]
                scaled = w / w.max() if w.max() > 0 else w
                ax_points.scatter(
                    p[:, 1].numpy(), p[:, 0].numpy(), c=scaled.numpy(), s=(2 + 18 * scaled).numpy(),
                    cmap="autumn", vmin=0, vmax=1, linewidths=0,
                )  # fmt: skip
            if saliency:
                result = saliency_region(
                    model, image, node.layer, node.position, node.channel, error_bound, fill,
                    block_size=block_size, erf=erf,
                )  # fmt: skip
                keep = result.mask.float().numpy()
                dimmed = background * (0.25 + 0.75 * keep[..., None])
                ax_saliency.imshow(dimmed)
                ax_saliency.contour(keep, levels=[0.5], colors="lime", linewidths=0.8)
                ax_saliency.set_xlabel(
                    f"area {100 * result.area_fraction:.1f}%, err {result.error:.2f}", fontsize=7
                )
            centre = None if node.is_roi else position_to_image(model, image, node.layer, node.position)
            for ax in (ax_erf, ax_points, ax_saliency):
                _draw_node(ax, node, centre, Rectangle)
            if r == 0:
                ax_erf.set_title(f"{spec.label}: ERF", fontsize=8)
                ax_points.set_title("sampling locations" if not node.is_roi else "bin locations", fontsize=8)
                ax_saliency.set_title("saliency region", fontsize=8)
            if n == 0:
                ax_erf.set_ylabel(label, fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=out.parent)
    os.close(handle)
    try:
        figure.savefig(temporary, format="png")
        os.replace(temporary, out)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return out


def _draw_node(ax, node, centre: tuple[float, float] | None, Rectangle) -> None:
    """Mark the node: a RoI node's box, or a layer node's ``centre`` (y, x) in the image. ``imshow`` puts
    pixel centres at integers, so box coordinates (pixel ``j`` spans ``[j, j + 1)``) are drawn 0.5 lower."""
    if node.is_roi:
        x1, y1, x2, y2 = node.position
        corner = (x1 - 0.5, y1 - 0.5)
        ax.add_patch(Rectangle(corner, x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1.2))
    else:
        assert centre is not None  # given for every layer node
        y, x = centre
        ax.plot(
            [x], [y], marker="o", markersize=4, color="lime", markeredgecolor="black", markeredgewidth=0.5
        )
