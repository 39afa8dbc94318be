"""RoI nodes (and layer nodes) on a detector built by the library."""

from __future__ import annotations

import itertools

import pytest
import torch

from deformable.analysis import (
    WEIGHTINGS,
    effective_receptive_field,
    effective_sampling_locations,
    make_node,
    position_to_image,
    saliency_region,
    sampling_locations_by_layer,
    trace_geometry,
)
from deformable.analysis._core import resolve_node
from deformable.models import fasterrcnn_resnet50_fpn_dcn

BOX = (10.0, 12.0, 40.0, 50.0)  # x1, y1, x2, y2


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3))


def test_roi_node_erf_bins_and_saliency(detector, image):
    erf = effective_receptive_field(detector, image, "roi", BOX, channel=1)
    assert erf.shape == (64, 64) and bool(torch.isfinite(erf).all()) and float(erf.sum()) > 0

    (bins,) = sampling_locations_by_layer(detector, image, "roi", BOX, channel=1)
    assert bins.layer == "roi_heads.box_roi_pool" and bins.points.shape == (49, 2)
    # Zero-initialised offsets: the 7x7 bin centres of the box, row-major, in pixel-centre coordinates
    # (box coordinates minus 0.5).
    ys = BOX[1] + (torch.arange(7, dtype=torch.float64) + 0.5) * (BOX[3] - BOX[1]) / 7 - 0.5
    xs = BOX[0] + (torch.arange(7, dtype=torch.float64) + 0.5) * (BOX[2] - BOX[0]) / 7 - 0.5
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
    xs = BOX[0] + (torch.arange(7, dtype=torch.float64) + 0.5) * (BOX[2] - BOX[0]) / 7 + 3.0 - 0.5
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


def _small_detector(roi_pool: str, **options):
    """A fresh ResNet-18 FPN Faster R-CNN (DCNv2 in conv5) with the given RoI pooling (eval mode)."""
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn_dcn(
        num_classes=3, backbone="resnet18", dcn_stages=(5,), min_size=64, max_size=96, roi_pool=roi_pool,
        roi_pool_options=options or None,
    )  # fmt: skip
    return model.eval()


def _bin_centres(box, ph=7, pw=7, dx=0.0):
    """Pixel-centre image coordinates [ph*pw, 2] of the bins of ``box``, moved right by ``dx`` pixels."""
    ys = box[1] + (torch.arange(ph, dtype=torch.float64) + 0.5) * (box[3] - box[1]) / ph - 0.5
    xs = box[0] + (torch.arange(pw, dtype=torch.float64) + 0.5) * (box[2] - box[0]) / pw - 0.5 + dx
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)


def test_roi_bins_with_one_offset_branch_per_level():
    # With share_offset_branch=False every FPN level's branch predicts (possibly for no RoI): the bins
    # used to be read from whichever branch ran last (an empty level), an IndexError.
    model = _small_detector("mdpool", share_offset_branch=False)
    pooler = model.roi_heads.box_roi_pool
    with torch.no_grad():
        for level, branch in enumerate(pooler.pools):
            branch.offset_mask_fc[-1].bias[:49] = 0.2 * (level + 1)  # x offsets, different per level
    image = torch.rand(3, 80, 100, generator=torch.Generator().manual_seed(0))
    box = (20.0, 10.0, 70.0, 60.0)
    results = {w: sampling_locations_by_layer(model, image, "roi", box, weighting=w) for w in WEIGHTINGS}
    with torch.no_grad():
        images, _ = model.transform([image])
    ratio = images.image_sizes[0][1] / 100
    level = int(pooler.map_levels([torch.tensor([box]) * ratio])[0])
    assert level == 0 and len(pooler.pools) == 4  # the RoI's level is not the last one
    expected = _bin_centres(box, dx=0.1 * 0.2 * (level + 1) * (box[2] - box[0]))  # gamma * offset * width
    for (bins,) in results.values():
        assert torch.allclose(bins.points.double(), expected, atol=1e-4)
        assert bool(torch.isfinite(bins.weights).all()) and float(bins.weights.sum()) > 0


def test_roialign_bins_have_location_weights_equal_to_zero_offset_deformable_pooling():
    # weighting="location" on a RoIAlign detector used to raise; RoIAlign is deformable RoI pooling with
    # zero offsets, so its bins' location gradients are those of a DCNv1 pooling whose offsets are 0.
    # A deformable pooling with gamma=0 ignores its offsets (here non-zero): RoIAlign too.
    align = _small_detector("align")
    dpools = [_small_detector("dpool"), _small_detector("dpool", gamma=0.0)]
    with torch.no_grad():
        dpools[1].roi_heads.box_roi_pool.pools[0].offset_fc[-1].bias.fill_(0.7)
    for dpool in dpools:
        report = dpool.load_state_dict(align.state_dict(), strict=False)
        assert not report.unexpected_keys and all(".pools." in key for key in report.missing_keys)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    weights = {}
    for weighting, dpool in itertools.product(("location", "value"), dpools):
        (ours,) = sampling_locations_by_layer(align, image, "roi", BOX, channel=1, weighting=weighting)
        (theirs,) = sampling_locations_by_layer(dpool, image, "roi", BOX, channel=1, weighting=weighting)
        assert torch.allclose(ours.points, theirs.points, atol=1e-5)
        assert float(ours.weights.sum()) > 0
        assert torch.allclose(ours.weights, theirs.weights, rtol=1e-4, atol=1e-9)
        weights[weighting] = ours.weights
    _, default = effective_sampling_locations(align, image, "roi", BOX, channel=1)  # default: "location"
    assert torch.equal(default, weights["location"])


def test_roi_bins_are_in_pixel_centre_coordinates():
    # A box over the whole image has its bins centred on the image centre, ((H - 1) / 2, (W - 1) / 2) in
    # the pixel-centre coordinates of the ERF and the convolution samples (was (H / 2, W / 2)).
    model = _small_detector("align")
    image = torch.rand(3, 80, 100, generator=torch.Generator().manual_seed(2))
    (bins,) = sampling_locations_by_layer(model, image, "roi", (0.0, 0.0, 100.0, 80.0))
    assert bins.points.double().mean(0).tolist() == pytest.approx([39.5, 49.5], abs=1e-4)
    assert torch.allclose(bins.points.double(), _bin_centres((0.0, 0.0, 100.0, 80.0)), atol=1e-4)
