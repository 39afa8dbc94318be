"""Effective sampling locations, their back-projection to the image, and the effective dilation."""

from __future__ import annotations

import itertools

import pytest
import torch

from deformable.analysis import (
    effective_dilation,
    effective_sampling_locations,
    sampling_layers,
    sampling_locations_by_layer,
)
from deformable.models import resnet18_dcn
from deformable.ops import deform_conv2d

from .helpers import randomise_offsets, stack


def _grid(positions, stride, padding, dilation, scale, shift=0.0):
    """Image coordinates of the regular grids of ``positions`` (one axis), back-projected by hand."""
    return sorted(shift + scale * (o * stride - padding + i * dilation) for o in positions for i in range(3))


def _sorted_points(points):
    return sorted(map(tuple, points.tolist()))


def test_zero_offsets_give_the_regular_dilated_grid_back_projected():
    model = stack("v1")  # fresh DCNv1 layers: zero offsets
    image = torch.rand(3, 24, 24, dtype=torch.float64)
    per_layer = {s.layer: s for s in sampling_locations_by_layer(model, image, "4", (5, 5), layers="all")}
    assert list(per_layer) == ["0", "2", "4"]

    # Layer "4" (3x3, stride 1) samples the stride-2 map around position 5: image rows/cols 8, 10, 12.
    expected = [(y, x) for y in (8.0, 10.0, 12.0) for x in (8.0, 10.0, 12.0)]
    assert _sorted_points(per_layer["4"].points) == expected
    # Layer "2" (stride 2, dilation 2, padding 2) at positions 4..6 samples the stride-1 map.
    axis = _grid(range(4, 7), 2, 2, 2, 1.0)
    expected = sorted(itertools.product(axis, axis))
    assert _sorted_points(per_layer["2"].points) == expected
    # Layer "0" is reached only at the even positions that layer "2" samples (its dilation skips the odd).
    positions = per_layer["0"].positions.unique(dim=0).tolist()
    assert positions == [[y, x] for y in range(6, 15, 2) for x in range(6, 15, 2)]
    axis = _grid(range(6, 15, 2), 1, 1, 1, 1.0)
    assert _sorted_points(per_layer["0"].points) == sorted(itertools.product(axis, axis))

    points, weights = effective_sampling_locations(model, image, "4", (5, 5))  # default: the DCN layers
    assert points.shape == (81 + 9, 2) and weights.shape == (90,)
    assert bool((weights >= 0).all()) and float(weights.sum()) > 0


def test_offsets_move_the_back_projected_points():
    model = stack("v1")
    with torch.no_grad():
        bias = model[4].conv_offset.bias.view(9, 2)
        bias[:, 0], bias[:, 1] = 0.5, -0.25  # every tap moves by (dy, dx) = (0.5, -0.25) input pixels
    image = torch.rand(3, 24, 24, dtype=torch.float64)
    (top,) = [s for s in sampling_locations_by_layer(model, image, "4", (5, 5)) if s.layer == "4"]
    expected = [(y + 1.0, x - 0.5) for y in (8.0, 10.0, 12.0) for x in (8.0, 10.0, 12.0)]  # stride 2
    assert _sorted_points(top.points) == expected


def test_regular_network_contributes_its_fixed_grid():
    model = stack("regular")
    assert sampling_layers(model) == ["0", "2", "4"]
    image = torch.rand(3, 24, 24, dtype=torch.float64)
    (top,) = [s for s in sampling_locations_by_layer(model, image, "4", (5, 5), layers=["4"])]
    assert _sorted_points(top.points) == [(y, x) for y in (8.0, 10.0, 12.0) for x in (8.0, 10.0, 12.0)]
    # "value" weights of the top layer: |d node / d x(p_k)| summed over input channels = sum_c |W[ch, c, k]|.
    (top,) = sampling_locations_by_layer(
        model, image, "4", (5, 5), channel=1, layers=["4"], weighting="value"
    )
    expected = model[4].weight[1].abs().sum(0).flatten()
    assert torch.allclose(top.weights[top.taps.argsort()], expected)


def test_resnet18_dcn_top_layer_grid():
    model = resnet18_dcn(dcn="v2")
    image = torch.rand(3, 32, 32)
    per_layer = {s.layer: s for s in sampling_locations_by_layer(model, image, "layer4.1.conv2", (0, 0))}
    assert len(per_layer) == 12  # every 3x3 DCN of conv3-conv5 lies under the node
    expected = [(y, x) for y in (-32.0, 0.0, 32.0) for x in (-32.0, 0.0, 32.0)]
    assert _sorted_points(per_layer["layer4.1.conv2"].points) == expected
    assert per_layer["layer2.0.conv1"].input_geometry.y.scale == 4


@pytest.mark.parametrize("weighting", ["value", "contribution", "location"])
def test_weightings_are_non_negative_and_cover_the_same_samples(weighting):
    model = randomise_offsets(stack("v2"))
    image = torch.rand(3, 16, 16, dtype=torch.float64)
    points, weights = effective_sampling_locations(model, image, "4", (3, 4), weighting=weighting)
    reference, _ = effective_sampling_locations(model, image, "4", (3, 4))
    assert torch.equal(points, reference)
    assert bool((weights >= 0).all()) and float(weights.sum()) > 0
    top, top_weights = effective_sampling_locations(
        model, image, "4", (3, 4), weighting=weighting, max_points=10
    )
    assert top.shape == (10, 2) and torch.allclose(top_weights, weights.topk(10).values)


def test_location_weights_are_gradients_per_image_pixel_and_the_default():
    # The spec's weight is the gradient with respect to the sampling location; layer "4" samples a map of
    # stride 2, so the gradient per image pixel is half the gradient per input-map pixel (the weights
    # used to be in input-map pixels, and "value" was the default).
    model = randomise_offsets(stack("v2"))
    image = torch.rand(3, 16, 16, dtype=torch.float64)
    position = (3, 4)
    (top,) = sampling_locations_by_layer(model, image, "4", position, layers=["4"])
    assert top.input_geometry.y.scale == top.input_geometry.x.scale == 2.0

    dcn = model[4]
    with torch.no_grad():
        features = model[:4](image[None])
        offset, mask = dcn.offsets_and_mask(features)
    offset.requires_grad_(True)
    out = deform_conv2d(features, offset, dcn.weight, dcn.bias, dcn.stride, dcn.padding, dcn.dilation, mask)
    (grad,) = torch.autograd.grad(out[0, :, position[0], position[1]].sum(), offset)
    per_map_pixel = grad[0, :, position[0], position[1]].reshape(9, 2).norm(dim=1)  # taps (y, x) pairs
    assert float(per_map_pixel.sum()) > 0
    assert torch.allclose(top.weights[top.taps.argsort()], per_map_pixel / 2)

    _, default = effective_sampling_locations(model, image, "4", position)
    _, located = effective_sampling_locations(model, image, "4", position, weighting="location")
    _, valued = effective_sampling_locations(model, image, "4", position, weighting="value")
    assert torch.equal(default, located) and not torch.allclose(default, valued)


def test_effective_dilation():
    model = stack("v1")
    image = torch.rand(3, 16, 16, dtype=torch.float64)
    maps = effective_dilation(model, image)
    assert list(maps) == ["2", "4"]
    assert torch.allclose(maps["2"].dilation, torch.full((8, 8), 2.0, dtype=torch.float64))
    assert torch.allclose(maps["4"].dilation, torch.ones(8, 8, dtype=torch.float64))
    assert maps["4"].input_scale == (2.0, 2.0)
    assert maps["4"].centers[3, 5].tolist() == [6.0, 10.0]
    with torch.no_grad():  # rows of taps spread apart by 0.5: vertical pairs 1.5 apart, horizontal 1
        bias = model[4].conv_offset.bias.view(3, 3, 2)
        bias[:, :, 0] = torch.tensor([-0.5, 0.0, 0.5], dtype=bias.dtype)[:, None]
    assert torch.allclose(
        effective_dilation(model, image)["4"].dilation, torch.full((8, 8), 1.25, dtype=torch.float64)
    )


def test_sampling_layer_selection_errors():
    model = stack("v2")
    with pytest.raises(ValueError, match="layers"):
        sampling_layers(model, "some")
    with pytest.raises(ValueError, match="not a deformable layer"):
        sampling_layers(model, ["1"])
    for bad in (5, [4]):  # was "'int' object is not iterable" / a KeyError-like miss
        with pytest.raises(ValueError, match="layers must be None"):
            sampling_layers(model, bad)
    with pytest.raises(ValueError, match="weighting"):
        effective_sampling_locations(
            model, torch.rand(3, 8, 8, dtype=torch.float64), "4", (0, 0), weighting="x"
        )
    image = torch.rand(3, 8, 8, dtype=torch.float64)
    for max_points, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="max_points"):
            effective_sampling_locations(model, image, "4", (0, 0), max_points=max_points)


@pytest.mark.parametrize("model", ["model", None, [torch.nn.Conv2d(3, 3, 3)]])
def test_analysis_entry_points_want_a_module(model):
    from deformable.analysis import effective_receptive_field, saliency_region

    image = torch.rand(3, 8, 8)
    for call in (
        lambda: effective_receptive_field(model, image, "0", (0, 0)),
        lambda: effective_sampling_locations(model, image, "0", (0, 0)),
        lambda: saliency_region(model, image, "0", (0, 0)),
        lambda: effective_dilation(model, image),
    ):
        with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
            call()


def test_location_weights_are_zero_off_the_map_on_every_edge():
    """Padding taps at exactly -1 (zero offsets, a plain convolution's grid) have the operator's
    one-sided offset gradient there; their weight at the top-left corner came to 85% of the node's,
    on samples that read zeros, while those at the bottom-right (H, W) weighed 0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1)).double()
    image = torch.rand(1, 6, 6, dtype=torch.float64) + 1
    for position in ((0, 0), (5, 5), (0, 5)):
        points, weights = effective_sampling_locations(model, image, "0", position, channel=0)
        off_map = ((points < -0.5) | (points > 5.5)).any(1)
        assert bool(off_map.any()) and float(weights[off_map].abs().sum()) == 0.0
        assert float(weights[~off_map].sum()) > 0
