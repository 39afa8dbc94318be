"""Analysis of a node's spatial support (DCNv2 paper, Section 2): effective receptive fields, effective
sampling / bin locations and error-bounded saliency regions, their statistics and the paper's figures.

A *node* is one position of a layer's output (``layer`` = a name from ``model.named_modules()``,
``position`` = ``(y, x)`` in that layer's output map, ``channel`` = one channel or None for all of them:
the response is then the feature vector at the position and gradients are those of its sum), or, for a
torchvision Faster/Mask R-CNN, the RoI head for one box: ``layer="roi"``, ``position`` = the box
``(x1, y1, x2, y2)`` in image pixels, ``channel`` = a class (None: the best foreground class). A RoI
node's response is the 2fc output; gradients are those of the class score.

Image points are pixel-centre coordinates ``(y, x)`` (pixel centres at integers); boxes follow
torchvision's convention (pixel ``j`` spans ``[j, j + 1)``, so box coordinate ``u`` is pixel-centre
coordinate ``u - 0.5``). Effective sampling locations are weighted by default by the gradient of the
node with respect to the sampling location, per image pixel (``weighting="location"``). The analyses take
gradients whatever the caller's autograd mode (``torch.no_grad()``, ``torch.inference_mode()``).

Images are ``[C, H, W]`` tensors in the model's input space (detectors: unnormalised values in [0, 1];
their transform normalises and resizes, and every coordinate here is in the given image). Models run in
evaluation mode during an analysis (their modes are restored afterwards).

Main functions:

- :func:`effective_receptive_field` -> ``[H, W]``;
- :func:`effective_sampling_locations` -> ``(points [P, 2], weights [P])``
  (:func:`sampling_locations_by_layer` for the per-layer detail);
- :func:`saliency_region` -> :class:`SaliencyResult`;
- :func:`effective_dilation`, :func:`support_statistics` (statistics over images and nodes);
- :func:`plot_support_figure` (the paper's Figure 1/2 layout, needs matplotlib);
- :func:`add_cli` (the ``deformable analyze`` sub-command).

Matplotlib is imported only by the plotting functions and the command line.
"""

from ._core import ROI, Node, make_node
from .cli import add_cli
from .geometry import (
    AxisMap,
    MapGeometry,
    image_to_position,
    layer_geometry,
    position_to_image,
    theoretical_receptive_field,
    trace_geometry,
)
from .plotting import FigureNode, plot_support_figure
from .receptive_field import effective_receptive_field, erf_spread
from .saliency import SaliencyResult, saliency_region
from .sampling import (
    WEIGHTINGS,
    DilationMap,
    LayerSamples,
    effective_dilation,
    effective_sampling_locations,
    sampling_layers,
    sampling_locations_by_layer,
)
from .statistics import COCO_AREA_RANGES, SupportStatistics, size_category, support_statistics

__all__ = [
    "COCO_AREA_RANGES",
    "ROI",
    "WEIGHTINGS",
    "AxisMap",
    "DilationMap",
    "FigureNode",
    "LayerSamples",
    "MapGeometry",
    "Node",
    "SaliencyResult",
    "SupportStatistics",
    "add_cli",
    "effective_dilation",
    "effective_receptive_field",
    "effective_sampling_locations",
    "erf_spread",
    "image_to_position",
    "layer_geometry",
    "make_node",
    "plot_support_figure",
    "position_to_image",
    "saliency_region",
    "sampling_layers",
    "sampling_locations_by_layer",
    "size_category",
    "support_statistics",
    "theoretical_receptive_field",
    "trace_geometry",
]
