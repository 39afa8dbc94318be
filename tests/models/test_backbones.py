"""DCN backbones: placement, equivalence with torchvision's ResNet, parameter groups, compile."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from deformable.models import (
    convert_resnet_to_dcn,
    count_dcn_layers,
    freeze_offsets_to_identity,
    param_groups,
    resnet18_dcn,
    resnet50_dcn,
    resnext50_32x4d_dcn,
)
from deformable.nn import DCNv1, DCNv2


def _dcn_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, DCNv1 | DCNv2)]


@pytest.mark.parametrize(
    "kwargs, count, stages",
    [
        (dict(), 13, {"layer2", "layer3", "layer4"}),
        (dict(dcn="v1", dcn_stages=(5,)), 3, {"layer4"}),
        (dict(dcn_stages=(2,)), 3, {"layer1"}),
        (dict(dcn_stages=(2, 3, 4, 5)), 16, {"layer1", "layer2", "layer3", "layer4"}),
        (dict(dcn=None), 0, set()),
    ],
)
def test_resnet50_dcn_placement(kwargs, count, stages):
    model = resnet50_dcn(**kwargs)
    names = _dcn_names(model)
    assert len(names) == count == count_dcn_layers(model)
    assert {n.split(".")[0] for n in names} == stages
    assert all(n.endswith(".conv2") for n in names)  # the bottleneck's 3x3 convolution
    expected_cls = DCNv1 if kwargs.get("dcn") == "v1" else DCNv2
    assert all(isinstance(model.get_submodule(n), expected_cls) for n in names)


def test_resnext_keeps_groups_and_resnet18_converts_both_3x3():
    resnext = resnext50_32x4d_dcn(offset_groups=2)
    layer = resnext.layer3[0].conv2
    assert isinstance(layer, DCNv2) and layer.groups == 32 and layer.offset_groups == 2
    assert count_dcn_layers(resnext) == 13
    assert count_dcn_layers(resnet18_dcn()) == 12  # 2 blocks x two 3x3 convolutions x 3 stages


def test_dilated_stage_keeps_dilation():
    model = resnet50_dcn(replace_stride_with_dilation=[False, False, True])
    conv = model.layer4[1].conv2
    assert conv.dilation == (2, 2) and conv.padding == (2, 2)
    assert conv.conv_offset.dilation == (2, 2)


@pytest.mark.parametrize("dcn", ["v1", "v2"])
def test_identity_offsets_compute_the_plain_backbone(dcn):
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10).double().eval()
    model = resnet18_dcn(dcn=dcn, num_classes=10).double().eval()
    report = model.load_state_dict(plain.state_dict(), strict=False)
    assert not report.unexpected_keys
    assert all(".conv_offset." in k for k in report.missing_keys)
    freeze_offsets_to_identity(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-10, atol=1e-10)


def test_local_weights_file_loads(tmp_path):
    plain = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(plain.state_dict(), path)
    model = resnet18_dcn(weights=path)
    assert torch.equal(model.layer3[0].conv2.weight, plain.layer3[0].conv2.weight)
    with pytest.raises(ValueError, match="weights"):
        resnet18_dcn(weights="NOT_A_WEIGHT")


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(dcn="v3"), ValueError, "dcn"),
        (dict(dcn_stages=(1,)), ValueError, "dcn_stages"),
        (dict(dcn_stages=(3, 3)), ValueError, "dcn_stages"),
        (dict(dcn_stages=3), ValueError, "dcn_stages must be a sequence"),
        (dict(dcn_stages="345"), ValueError, "dcn_stages must be a sequence"),
        (dict(num_classes=0), ValueError, "num_classes"),
        (dict(num_classes=2.5), TypeError, "num_classes"),
        (dict(offset_groups=0), ValueError, "offset_groups"),
        (dict(replace_stride_with_dilation="yes"), ValueError, "replace_stride_with_dilation"),
        (dict(replace_stride_with_dilation=[False, True]), ValueError, "replace_stride_with_dilation"),
        # norm_layer is called per layer: a name failed with "'str' object is not callable", a module
        # instance deep inside batch norm with "'int' object has no attribute 'dim'"
        (dict(norm_layer="batchnorm"), TypeError, "norm_layer must be None or a callable"),
        (dict(norm_layer=3), TypeError, "norm_layer"),
        (dict(norm_layer=nn.BatchNorm2d(64)), TypeError, "norm_layer"),
    ],
)
def test_bad_backbone_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        resnet50_dcn(**kwargs)


@pytest.mark.parametrize(
    "builder, kwargs, words",
    [
        # torchvision's NotImplementedError "Dilation > 1 not supported in BasicBlock"
        ("resnet18_dcn", dict(replace_stride_with_dilation=[False, False, True]), "bottleneck ResNet"),
        # a TypeError naming the private _OffsetPredictingConv
        ("resnet50_dcn", dict(dcn="v1", layer_options={"mask_scale": 2.0}), r"takes .*mask_scale"),
        # "got multiple values for argument 'offset_groups'"
        ("resnet50_dcn", dict(layer_options={"offset_groups": 2}), "offset_groups is an argument of its own"),
    ],
)
def test_builder_options_that_torchvision_or_the_layers_refused_are_named(builder, kwargs, words):
    from deformable import models

    with pytest.raises(ValueError, match=words):
        getattr(models, builder)(**kwargs)
    assert models.resnet50_dcn(layer_options={"mask_scale": 2.0, "backend": "aten", "offset_lr_mult": 0.5})


@pytest.mark.parametrize("function", [count_dcn_layers, freeze_offsets_to_identity])
def test_module_helpers_want_a_module(function):
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        function("resnet")  # was an AttributeError


@pytest.mark.parametrize("model", ["resnet", torch.nn.Linear(2, 2), torch.nn.Sequential()])
def test_convert_wants_a_resnet(model):
    error = TypeError if isinstance(model, str) else ValueError
    with pytest.raises(error, match="model must be a ResNet"):
        convert_resnet_to_dcn(model)


@pytest.mark.parametrize(
    "model, kwargs, error, words",
    [
        ("model", dict(lr=0.1), TypeError, "model must be a torch.nn.Module"),
        (None, dict(lr=None), TypeError, "lr must be a number"),
        (None, dict(lr=float("nan")), ValueError, "lr must be a finite"),
        (None, dict(lr=0.1, weight_decay=-1), ValueError, "weight_decay must be a finite number >= 0"),
        (None, dict(lr=0.1, offset_weight_decay="x"), TypeError, "offset_weight_decay"),
    ],
)
def test_bad_param_groups_arguments(model, kwargs, error, words):
    with pytest.raises(error, match=words):
        param_groups(model if model is not None else torch.nn.Linear(2, 2), **kwargs)


def test_param_groups_multipliers_and_decay():
    model = resnet18_dcn(dcn="v2", dcn_stages=(5,))
    model.layer2[0].conv2 = DCNv1.from_conv2d(model.layer2[0].conv2)
    groups = {g["name"]: g for g in param_groups(model, lr=0.02, weight_decay=1e-4)}
    v2, v1 = model.layer4[0].conv2.conv_offset, model.layer2[0].conv2.conv_offset
    assert id(v2.weight) in {id(p) for p in groups["offsets x0.1"]["params"]}
    assert groups["offsets x0.1"]["lr"] == pytest.approx(0.002)
    assert groups["offsets x0.1"]["weight_decay"] == 1e-4
    assert [id(p) for p in groups["offsets x1"]["params"]] == [id(v1.weight)]
    # the offset branches' biases: their multiplier, and no weight decay, as every bias
    assert id(v2.bias) in {id(p) for p in groups["offset biases x0.1"]["params"]}
    assert groups["offset biases x0.1"]["lr"] == pytest.approx(0.002)
    assert [id(p) for p in groups["offset biases x1"]["params"]] == [id(v1.bias)]
    assert groups["offset biases x1"]["weight_decay"] == 0.0
    assert groups["norm"]["weight_decay"] == 0.0 and groups["bias"]["weight_decay"] == 0.0
    assert groups["weights"]["weight_decay"] == 1e-4
    every = [id(p) for g in groups.values() for p in g["params"]]
    assert len(every) == len(set(every)) == len(list(model.parameters()))


@pytest.mark.slow
def test_torch_compile_dcn_backbone():
    torch._dynamo.reset()
    model = resnet18_dcn(num_classes=4).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DCNv2):
                m.conv_offset.weight.normal_(0, 0.01)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(rois_per_image="a"), "rois_per_image must be a positive int"),
        (dict(rois_per_image=2.5), "rois_per_image must be a positive int"),
        (dict(patch_size=None), "patch_size must be a positive int"),
        (dict(mimic_weight=-1), "mimic_weight must be a finite number >= 0"),
        (dict(mimic_weight=float("nan")), "mimic_weight"),
        (dict(cls_weight="x"), "cls_weight"),
        (dict(select="most"), "select"),
    ],
)
def test_bad_mimic_options(kwargs, words):
    from deformable.models import MimicOptions

    with pytest.raises(ValueError, match=words):
        MimicOptions(**kwargs)


def test_feature_mimicking_wants_mimic_options():
    from deformable.models import FeatureMimicking

    with pytest.raises(TypeError, match="options must be a MimicOptions"):
        FeatureMimicking(8, 3, {"rois_per_image": 2})  # was accepted, failing only in training


def test_weights_of_another_shape_are_a_value_error(tmp_path):
    """Weights that do not fit (another class count, another depth) are a ValueError naming the fit,
    not load_state_dict's RuntimeError."""
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match=r"weights do not fit resnet18 with num_classes=10: .*fc\.weight"):
        resnet18_dcn(weights=str(path), num_classes=10)
    deeper = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), deeper)
    with pytest.raises(ValueError, match="weights do not fit resnet18"):
        resnet18_dcn(weights=str(deeper))


def test_layer_options_reach_every_dcn_layer():
    """``layer_options`` are the DCN layers' own arguments (mask_scale used to be a TypeError from
    torchvision's ResNet)."""
    model = resnet18_dcn(layer_options={"mask_scale": 2.0})
    scales = {m.mask_scale for m in model.modules() if isinstance(m, DCNv2)}
    assert scales == {2.0}
    with pytest.raises(TypeError, match="layer_options must be a dict"):
        resnet18_dcn(layer_options=[("mask_scale", 2.0)])
