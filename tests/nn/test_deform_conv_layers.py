"""DCNv1 / DCNv2 / DeformConv2d layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deformable.nn import DCNv1, DCNv2, DeformConv2d
from deformable.ops import deform_conv2d


def _conv(groups: int = 1, stride=1, dilation=1, bias=True) -> nn.Conv2d:
    return nn.Conv2d(
        6, 4, (3, 3), stride=stride, padding=1, dilation=dilation, groups=groups, bias=bias
    ).double()


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2)])
def test_fresh_dcnv1_equals_its_conv(groups, stride, dilation):
    conv = _conv(groups, stride, dilation)
    layer = DCNv1.from_conv2d(conv, offset_groups=3)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask_scale", [1.0, 2.0])
def test_fresh_dcnv2_equals_scaled_conv(mask_scale):
    conv = _conv(groups=2)
    layer = DCNv2.from_conv2d(conv, offset_groups=2, mask_scale=mask_scale)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    no_bias = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    expected = mask_scale / 2 * no_bias + conv.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_conv_offset_shapes_and_zero_init():
    v1 = DCNv1(8, 16, 3, padding=1, offset_groups=2)
    v2 = DCNv2(8, 16, (3, 2), padding=(1, 0), offset_groups=4)
    assert v1.conv_offset.out_channels == 2 * 2 * 9
    assert v2.conv_offset.out_channels == 3 * 4 * 6
    assert v2.conv_offset.kernel_size == (3, 2) and v2.conv_offset.padding == (1, 0)
    for layer in (v1, v2):
        assert not layer.conv_offset.weight.any() and not layer.conv_offset.bias.any()


def test_state_dict_names_follow_mmcv():
    assert set(DCNv2(4, 4, 3).state_dict()) == {"weight", "bias", "conv_offset.weight", "conv_offset.bias"}
    assert set(DCNv1(4, 4, 3, bias=False).state_dict()) == {
        "weight",
        "conv_offset.weight",
        "conv_offset.bias",
    }


def test_from_conv2d_copies_weights_and_hyperparameters():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, bias=False)
    layer = DCNv2.from_conv2d(conv)
    assert torch.equal(layer.weight, conv.weight) and layer.bias is None
    assert (layer.stride, layer.padding, layer.dilation) == ((2, 2), (2, 2), (2, 2))
    assert layer.weight is not conv.weight


def test_from_conv2d_keeps_a_frozen_conv_frozen_and_its_mode():
    """Converting a frozen stage (a backbone's trainable_layers) made its convolutions trainable again,
    beside their frozen batch norms."""
    frozen = nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False).eval()
    layer = DCNv2.from_conv2d(frozen)
    assert not any(p.requires_grad for p in layer.parameters()) and not layer.training
    assert not any(m.training for m in layer.modules())
    trainable = DCNv1.from_conv2d(nn.Conv2d(4, 4, 3, padding=1))
    assert all(p.requires_grad for p in trainable.parameters()) and trainable.training


@pytest.mark.parametrize("cls", [DCNv1, DCNv2])
def test_gradients_reach_the_offset_conv(cls):
    layer = cls(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    layer(x).square().sum().backward()
    assert layer.conv_offset.weight.grad.abs().sum() > 0
    assert layer.weight.grad.abs().sum() > 0


def test_dcnv2_uses_predicted_offsets_and_mask():
    torch.manual_seed(0)
    layer = DCNv2(4, 6, 3, padding=1, offset_groups=2).double()
    nn.init.normal_(layer.conv_offset.weight, std=0.3)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    raw = layer.conv_offset(x)
    offset, logits = raw[:, :36], raw[:, 36:]
    expected = deform_conv2d(x, offset, layer.weight, layer.bias, 1, 1, 1, torch.sigmoid(logits))
    torch.testing.assert_close(layer(x), expected)


def test_deform_conv2d_module_takes_offsets():
    layer = DeformConv2d(4, 6, 3, padding=1, groups=2)
    x = torch.randn(2, 4, 5, 5)
    offset = torch.randn(2, 18, 5, 5)
    torch.testing.assert_close(layer(x, offset), deform_conv2d(x, offset, layer.weight, layer.bias, 1, 1, 1))


def test_learning_rate_multipliers():
    assert DCNv2(4, 4, 3).offset_lr_mult == 0.1
    assert DCNv1(4, 4, 3).offset_lr_mult == 1.0
    assert DCNv2(4, 4, 3, offset_lr_mult=0.5).offset_lr_mult == 0.5


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(in_channels=0), ValueError, "in_channels"),
        (dict(in_channels=4.0), TypeError, "in_channels"),
        (dict(out_channels=-4), ValueError, "out_channels"),
        (dict(groups=3), ValueError, "groups"),
        (dict(offset_groups=3), ValueError, "offset_groups"),
        (dict(padding_mode="reflect"), ValueError, "padding_mode"),
        (dict(padding="same"), ValueError, "padding"),
        (dict(kernel_size=0), ValueError, "kernel_size"),
        (dict(kernel_size=(3,)), TypeError, "kernel_size"),
        (dict(kernel_size=True), TypeError, "kernel_size"),
        (dict(stride=0), ValueError, "stride"),
        (dict(padding=-1), ValueError, "padding"),
        (dict(dilation=(1, 0)), ValueError, "dilation"),
        (dict(mask_scale=0), ValueError, "mask_scale"),
        (dict(mask_scale=float("nan")), ValueError, "mask_scale"),
        (dict(mask_scale=float("inf")), ValueError, "mask_scale"),
        (dict(offset_lr_mult=-1), ValueError, "offset_lr_mult"),
        (dict(offset_lr_mult=float("nan")), ValueError, "offset_lr_mult"),
        (dict(offset_lr_mult="0.1"), TypeError, "offset_lr_mult"),
        (dict(bias=torch.zeros(4)), TypeError, "bias must be a bool"),
        (dict(bias="yes"), TypeError, "bias must be a bool"),
        (dict(backend="nonsense"), ValueError, "backend must be one of"),  # was found at forward only
        (dict(backend=1), TypeError, "backend must be one of"),
    ],
)
def test_bad_layer_arguments(kwargs, error, words):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(error, match=words):
        DCNv2(**args)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(kernel_size=0), ValueError, "kernel_size"),
        (dict(kernel_size=(3,)), TypeError, "kernel_size"),
        (dict(padding="same"), ValueError, "padding"),
        (dict(stride=(1, 0)), ValueError, "stride"),
    ],
)
def test_bad_deform_conv2d_module_arguments(kwargs, error, words):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(error, match=words):
        DeformConv2d(**args)


def test_zero_offset_lr_mult_is_allowed():
    assert DCNv1(4, 4, 3, offset_lr_mult=0).offset_lr_mult == 0.0


@pytest.mark.parametrize("cls", [DCNv1, DCNv2])
@pytest.mark.parametrize("shape", [(2, 5, 8, 8), (4, 8, 8), (1, 1, 4, 8, 8)])
def test_input_of_the_wrong_shape_names_in_channels(cls, shape):
    layer = cls(4, 6, 3, padding=1)
    with pytest.raises(ValueError, match=r"input must be \[N, 4, H, W\] \(in_channels=4\)"):
        layer(torch.randn(*shape))


def test_deform_conv2d_layer_refuses_a_multiple_of_its_in_channels():
    """Twice the channels would fit the weight as two groups: nn.Conv2d refuses it, so does the layer."""
    layer = DeformConv2d(4, 4, 3, padding=1)
    with pytest.raises(ValueError, match=r"input must be \[N, 4, H, W\] \(in_channels=4\)"):
        layer(torch.randn(1, 8, 5, 5), torch.randn(1, 18, 5, 5))


@pytest.mark.parametrize("cls", [DCNv1, DCNv2])
def test_input_smaller_than_the_kernel_says_the_output_would_be_empty(cls):
    with pytest.raises(ValueError, match="the output would be empty"):
        cls(4, 4, 3)(torch.randn(1, 4, 2, 2))


@pytest.mark.parametrize("cls", [DCNv1, DCNv2])
def test_input_of_another_dtype_names_both_dtypes(cls):
    layer = cls(4, 4, 3, padding=1)
    with pytest.raises(TypeError, match=r"torch\.float64.*torch\.float32"):
        layer(torch.randn(1, 4, 5, 5, dtype=torch.float64))


@pytest.mark.parametrize("cls", [DCNv1, DCNv2])
def test_integer_input_is_refused_as_such(cls):
    """Not 'convert the layer to int64': a deformable layer needs a floating-point input."""
    with pytest.raises(TypeError, match=r"input must be a floating-point tensor, got torch\.int64"):
        cls(4, 4, 3, padding=1)(torch.zeros(1, 4, 5, 5, dtype=torch.long))


@pytest.mark.parametrize("backend", ["reference", "aten"])
def test_outputs_are_contiguous_whatever_the_backend(backend):
    layer = DCNv2(4, 6, 3, padding=1, backend=backend)
    out = layer(torch.randn(2, 4, 5, 5))
    assert out.is_contiguous()
    assert out.view(2, -1).shape == (2, 6 * 25)


def test_from_conv2d_rejects_other_modules():
    with pytest.raises(TypeError, match="conv"):
        DCNv2.from_conv2d(nn.Linear(3, 3))


def test_per_sample_gradients_of_a_dcnv2_layer():
    """torch.func over a whole layer: vmap(grad(functional_call)) gives every parameter's gradient per
    sample, as one backward per sample does (offset branch included)."""
    layer = DCNv2(2, 3, 3, padding=1).double()
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.1)  # non-trivial offsets and masks
    params = {name: p.detach() for name, p in layer.named_parameters()}
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)

    def loss(parameters, sample):
        return (torch.func.functional_call(layer, parameters, (sample[None],)) ** 2).sum()

    per_sample = torch.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(3):
        layer.zero_grad()
        loss(dict(layer.named_parameters()), x[i]).backward()
        for name, p in layer.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12)
