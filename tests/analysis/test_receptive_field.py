"""Effective receptive fields and the stack geometry they are checked against."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deformable.analysis import (
    effective_receptive_field,
    erf_spread,
    image_to_position,
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
