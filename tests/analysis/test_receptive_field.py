"""Effective receptive fields and the stack geometry they are checked against."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deformable.analysis import (
    effective_receptive_field,
    erf_spread,
    image_to_position,
    layer_geometry,
    position_to_image,
    theoretical_receptive_field,
    trace_geometry,
)
from deformable.models import resnet18_dcn

from .helpers import randomise_offsets, stack


def test_erf_of_stacked_3x3_convs_is_nonzero_exactly_on_the_theoretical_receptive_field():
    model = stack("regular")
    image = torch.rand(3, 24, 24, dtype=torch.float64)
    for position, (y0, y1, x0, x1) in [((5, 5), (5, 15, 5, 15)), ((4, 6), (3, 13, 7, 17))]:
        erf = effective_receptive_field(model, image, "4", position)
        expected = torch.zeros(24, 24, dtype=torch.bool)
        expected[y0 : y1 + 1, x0 : x1 + 1] = True
        assert torch.equal(erf != 0, expected)
        assert theoretical_receptive_field(model, image, "4", position) == (y0, y1, x0, x1)


def test_erf_of_a_single_conv_is_its_kernel_window_and_clipped_at_the_border():
    conv = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1).double())
    image = torch.rand(3, 8, 8, dtype=torch.float64)
    erf = effective_receptive_field(conv, image, "0", (0, 7), channel=1)
    assert (erf != 0).nonzero().tolist() == [[0, 6], [0, 7], [1, 6], [1, 7]]
    signed = effective_receptive_field(conv, image, "0", (3, 3), channel=1, reduction="none")
    assert torch.allclose(signed[:, 2:5, 2:5], conv[0].weight[1])


@pytest.mark.parametrize("kind", ["regular", "v2"])
def test_erf_matches_finite_differences(kind):
    model = randomise_offsets(stack(kind))
    image = torch.rand(3, 8, 8, dtype=torch.float64)
    layer, position, channel = "4", (2, 1), 1
    grad = effective_receptive_field(model, image, layer, position, channel, reduction="none")

    eps = 1e-6
    basis = torch.eye(image.numel(), dtype=image.dtype).reshape(-1, *image.shape)
    with torch.no_grad():
        plus = model(image + eps * basis)[:, channel, position[0], position[1]]
        minus = model(image - eps * basis)[:, channel, position[0], position[1]]
    numeric = ((plus - minus) / (2 * eps)).reshape(image.shape)
    assert torch.allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    assert torch.allclose(
        effective_receptive_field(model, image, layer, position, channel), numeric.abs().sum(0)
    )


def test_erf_spread_is_the_radius_of_gyration():
    erf = torch.zeros(9, 9)
    assert (
        erf_spread(erf.clone().index_put_((torch.tensor([4]), torch.tensor([4])), torch.tensor([1.0]))) == 0
    )
    erf[4, 2] = erf[4, 6] = 1.0
    assert erf_spread(erf) == pytest.approx(2.0)


def test_resnet_geometry_and_position_mapping():
    model = resnet18_dcn(dcn="v2")
    image = torch.rand(3, 32, 32)
    geometry = trace_geometry(model)
    for name, stride in [
        ("conv1", 2),
        ("maxpool", 4),
        ("layer1", 4),
        ("layer2", 8),
        ("layer3", 16),
        ("layer4", 32),
    ]:
        out = geometry[name][1]
        assert (out.y.scale, out.y.shift, out.x.scale, out.x.shift) == (stride, 0.0, stride, 0.0)
    # BasicBlock: the strided first 3x3 (a DCN layer) samples the stride-8 map, the second the stride-16 one
    assert geometry["layer3.0.conv1"][0].y.scale == 8
    assert geometry["layer3.0.conv2"][0].y.scale == 16
    assert geometry["layer3.0.downsample.0"][0].y.scale == 8
    assert geometry["avgpool"][1] is None
    assert position_to_image(model, image, "layer3", (1, 0)) == (16.0, 0.0)
    assert image_to_position(model, image, "layer3", (17.0, 30.0)) == (1, 1)  # clamped to the 2x2 map


def test_invalid_nodes_raise():
    model = stack()
    image = torch.rand(3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="outside the output map"):
        effective_receptive_field(model, image, "4", (9, 0))
    with pytest.raises(ValueError, match="not a module"):
        effective_receptive_field(model, image, "nope", (0, 0))
    with pytest.raises(ValueError, match="channel"):
        effective_receptive_field(model, image, "4", (0, 0), channel=5)
    with pytest.raises(ValueError, match="reduction"):
        effective_receptive_field(model, image, "4", (0, 0), reduction="max")


@pytest.mark.parametrize(
    "position, error, words",
    [
        ((1,), ValueError, r"position must be \(y, x\) ints"),
        ([1, 2, 3], ValueError, r"position must be \(y, x\) ints"),
        (("a", "b"), ValueError, r"position must be \(y, x\) ints"),
        ((float("nan"), 1), ValueError, r"position must be \(y, x\) ints"),
        ((1.5, 2), ValueError, r"position must be \(y, x\) ints"),
        ((True, 1), ValueError, r"position must be \(y, x\) ints"),
        (3, TypeError, "position must be a sequence"),
        ("ab", TypeError, "position must be a sequence"),
        ((-1, 0), ValueError, r"position \(-1, 0\) is outside .* y must be in \[0, 3\]"),
        ((0, 4), ValueError, r"position \(0, 4\) is outside .* x in \[0, 3\]"),
    ],
)
@pytest.mark.parametrize("function", [position_to_image, theoretical_receptive_field])
def test_map_positions_are_checked(function, position, error, words):
    # Used to raise IndexError, compute on strings, or extrapolate NaN/outside positions silently.
    image = torch.rand(3, 8, 8, dtype=torch.float64)  # layer "4": a 4x4 map
    with pytest.raises(error, match=words):
        function(stack(), image, "4", position)


def test_map_positions_accept_int_pairs_and_tensors():
    model, image = stack(), torch.rand(3, 8, 8, dtype=torch.float64)
    assert position_to_image(model, image, "4", torch.tensor([1, 2])) == (2.0, 4.0)
    assert theoretical_receptive_field(model, image, "4", [3, 3]) == (1.0, 11.0, 1.0, 11.0)
    assert position_to_image(model, image, "4", (torch.tensor(1), torch.tensor(2))) == (2.0, 4.0)


@pytest.mark.parametrize(
    "point, error",
    [((1.0,), ValueError), ((math.inf, 1.0), ValueError), ((math.nan, 1.0), ValueError), (None, TypeError)],
)
def test_image_points_are_checked(point, error):
    # A 1-element point was an IndexError, infinity an OverflowError.
    with pytest.raises(error, match="point"):
        image_to_position(stack(), torch.rand(3, 8, 8, dtype=torch.float64), "4", point)


def test_geometry_arguments_are_checked():
    model, image = stack(), torch.rand(3, 8, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="layer must be a module name"):
        layer_geometry(model, image, 4)
    with pytest.raises(TypeError, match=r"image must be a torch\.Tensor"):
        position_to_image(model, None, "4", (0, 0))
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        trace_geometry("model")
    with pytest.raises(ValueError, match="image_size"):
        trace_geometry(model, 5)
    with pytest.raises(TypeError, match="overrides"):
        trace_geometry(model, (8, 8), 3)
    with pytest.raises(TypeError, match=r"erf must be a torch\.Tensor"):
        erf_spread([[1.0]])


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_analyses_work_inside_no_grad_and_inference_mode(mode):
    # Every analysis takes gradients: they used to fail with "element 0 of tensors does not require grad"
    # when called inside torch.no_grad() or torch.inference_mode().
    from deformable.analysis import effective_dilation, saliency_region, sampling_locations_by_layer

    model = randomise_offsets(stack("v2"))
    image = torch.rand(3, 12, 12, dtype=torch.float64)
    node = ("4", (2, 3))

    def run(image):
        samples = sampling_locations_by_layer(model, image, *node)
        return (
            effective_receptive_field(model, image, *node),
            torch.cat([s.weights for s in samples]),
            saliency_region(model, image, *node, block_size=3).mask,
            effective_dilation(model, image)["4"].dilation,
        )

    expected = run(image)
    with mode():
        inside = run(image)
        made_inside = run(image.clone())  # an inference tensor under torch.inference_mode()
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    for ours, reference in zip((*inside, *made_inside), expected * 2, strict=True):
        assert torch.equal(ours, reference)
    assert float(expected[0].sum()) > 0 and float(expected[1].sum()) > 0
