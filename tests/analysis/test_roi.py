"""RoI nodes (and layer nodes) on a detector built by the library."""

from __future__ import annotations

import pytest
import torch

from deformable.analysis import (
    effective_receptive_field,
    effective_sampling_locations,
    make_node,
    position_to_image,
    saliency_region,
    sampling_locations_by_layer,
    trace_geometry,
)
from deformable.analysis._core import resolve_node

BOX = (10.0, 12.0, 40.0, 50.0)  # x1, y1, x2, y2


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3))


def test_roi_node_erf_bins_and_saliency(detector, image):
    erf = effective_receptive_field(detector, image, "roi", BOX, channel=1)
    assert erf.shape == (64, 64) and bool(torch.isfinite(erf).all()) and float(erf.sum()) > 0

    (bins,) = sampling_locations_by_layer(detector, image, "roi", BOX, channel=1)
    assert bins.layer == "roi_heads.box_roi_pool" and bins.points.shape == (49, 2)
    # Zero-initialised offsets: the 7x7 bin centres of the box, row-major.
    ys = BOX[1] + (torch.arange(7, dtype=torch.float64) + 0.5) * (BOX[3] - BOX[1]) / 7
    xs = BOX[0] + (torch.arange(7, dtype=torch.float64) + 0.5) * (BOX[2] - BOX[0]) / 7
    expected = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    assert torch.allclose(bins.points.double(), expected, atol=1e-4)
    assert bool((bins.weights >= 0).all()) and float(bins.weights.sum()) > 0

    result = saliency_region(detector, image, "roi", BOX, channel=1, block_size=32, erf=erf)
    assert result.error <= 0.1 and result.blocks.shape == (2, 2) and result.node.channel == 1


def test_roi_bins_follow_the_offsets_and_the_class_defaults_to_the_best(detector, image):
    branch = detector.roi_heads.box_roi_pool.pools[0].offset_mask_fc[-1]
    with torch.no_grad():
        saved = branch.bias.clone()
        branch.bias[:49] = 1.0  # x offsets: every bin moves by gamma * 1 * roi width = 3 pixels
    try:
        points, weights = effective_sampling_locations(detector, image, "roi", BOX, weighting="location")
    finally:
        with torch.no_grad():
            branch.bias.copy_(saved)
    xs = BOX[0] + (torch.arange(7, dtype=torch.float64) + 0.5) * (BOX[2] - BOX[0]) / 7 + 3.0
    assert torch.allclose(points[:, 1].double(), xs.repeat(7), atol=1e-4)
    assert weights.shape == (49,) and bool((weights >= 0).all())

    # Without a class, the node takes the best foreground class of the box, computed here by hand.
    with torch.no_grad():
        images, _ = detector.transform([image])
        features = detector.backbone(images.tensors)
        pooled = detector.roi_heads.box_roi_pool(features, [torch.tensor([BOX])], images.image_sizes)
        logits, _ = detector.roi_heads.box_predictor(detector.roi_heads.box_head(pooled))
    node = resolve_node(detector, image, make_node("roi", BOX))
    assert node.channel == int(logits[0, 1:].argmax()) + 1


def test_layer_node_on_a_detector(detector, image):
    geometry = trace_geometry(detector, (64, 64))
    assert geometry["backbone.body.layer3"][1].y.scale == pytest.approx(16.0)
    assert geometry["backbone.fpn.layer_blocks.0"][1].y.scale == pytest.approx(4.0)
    assert position_to_image(detector, image, "backbone.body.layer3", (2, 1)) == pytest.approx((32.0, 16.0))
    erf = effective_receptive_field(detector, image, "backbone.body.layer3", (2, 1))
    assert erf.shape == (64, 64) and float(erf.sum()) > 0
    per_layer = sampling_locations_by_layer(detector, image, "backbone.body.layer4", (1, 1))
    assert [s.layer for s in per_layer] == [
        f"backbone.body.layer4.{b}.conv{c}" for b in (0, 1) for c in (1, 2)
    ]
    top = per_layer[-1].points
    assert sorted({float(v) for v in top[:, 0]}) == [0.0, 32.0, 64.0]
    with pytest.raises(ValueError, match="must output a"):
        effective_receptive_field(detector, image, "backbone.fpn", (0, 0))
