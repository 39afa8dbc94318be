"""ONNX export (deformable.export): onnxruntime (CPU) against PyTorch, fp32, relative error <= 1e-5."""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from deformable.export import UnsupportedOperatorError, add_cli, export_onnx  # noqa: E402
from deformable.nn import DCNv1, DCNv2, DeformConv2d  # noqa: E402

HAS_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None
needs_onnxscript = pytest.mark.skipif(not HAS_ONNXSCRIPT, reason="the dynamo exporter needs onnxscript")
EXPORTERS = [pytest.param(True, id="dynamo", marks=needs_onnxscript), pytest.param(False, id="torchscript")]
RTOL = 1e-5


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check(session, model, *inputs):
    """Run ``session`` and ``model`` on ``inputs``; assert max |diff| <= RTOL * max |reference|."""
    with torch.no_grad():
        expected = model(*inputs).numpy()
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    (actual,) = session.run(None, feeds)
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-30)
    error = float(np.abs(actual - expected).max()) / scale
    assert error <= RTOL, f"relative error {error:.3g} > {RTOL}"


def _nodes(path, op_type):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op_type]


def _attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _randomise_offsets(model, std=0.5):
    """Non-zero offset/mask branches (fresh layers start at zero offsets)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (DCNv1, DCNv2)):
                module.conv_offset.weight.normal_(0, std / module.conv_offset.weight[0].numel() ** 0.5)
                module.conv_offset.bias.normal_(0, std)
    return model.eval()


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_dcnv2_layer_groups_offset_groups_stride_dilation(tmp_path, dynamo):
    layer = DCNv2(
        8, 12, 3, stride=2, padding=(1, 2), dilation=(2, 1), groups=2, offset_groups=2, mask_scale=2
    )
    layer = _randomise_offsets(layer, std=2.0)
    path = export_onnx(layer, torch.randn(2, 8, 13, 11), tmp_path / "dcnv2.onnx", dynamo=dynamo)
    (node,) = _nodes(path, "DeformConv")
    assert _attributes(node) == {
        "dilations": [2, 1], "group": 2, "kernel_shape": [3, 3], "offset_group": 2,
        "pads": [1, 2, 1, 2], "strides": [2, 2],
    }  # fmt: skip
    assert len(node.input) == 5  # X, W, offset, B, mask
    batch = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"
    session = _session(path)
    for n in (1, 3):
        _check(session, layer, torch.randn(n, 8, 13, 11))
    assert [p.name for p in tmp_path.iterdir()] == ["dcnv2.onnx"]  # no temporary file left


@needs_onnxscript
def test_dcnv1_layer_rectangular_kernel(tmp_path):
    layer = _randomise_offsets(DCNv1(6, 5, (3, 5), padding=(1, 2), bias=False), std=3.0)
    path = export_onnx(layer, torch.randn(1, 6, 9, 10), tmp_path / "dcnv1.onnx")  # batch 1 traced as 2
    (node,) = _nodes(path, "DeformConv")
    assert len(node.input) == 3 and _attributes(node)["kernel_shape"] == [3, 5]
    session = _session(path)
    for n in (2, 5):
        _check(session, layer, torch.randn(n, 6, 9, 10))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_deform_conv2d_given_offsets_and_mask_without_bias(tmp_path, dynamo):
    layer = DeformConv2d(4, 6, 3, padding=1, bias=False).eval()

    def inputs(n):
        offset = torch.randn(n, 18, 7, 8) * 4
        offset[:, 0::5] = offset[:, 0::5].round()  # integer offsets: samples exactly on borders
        offset[0, :2] = 1e6  # far outside the map
        return torch.randn(n, 4, 7, 8), offset, torch.rand(n, 9, 7, 8)

    path = export_onnx(layer, inputs(2), tmp_path / "given.onnx", dynamo=dynamo)
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == ["input_0", "input_1", "input_2"]
    for n in (1, 3):
        _check(session, layer, *inputs(n))


@needs_onnxscript
def test_dcn_stack(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        DCNv2(16, 16, 3, padding=1),
        nn.ReLU(),
        DCNv1(16, 24, 3, stride=2, padding=1),
        nn.ReLU(),
        DCNv2(24, 24, 3, padding=2, dilation=2, offset_groups=4, groups=3),
    )
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
    model = _randomise_offsets(model)
    model.train()  # exported in eval mode, and left as it was
    path = export_onnx(model, torch.randn(2, 3, 20, 18), tmp_path / "stack.onnx")
    assert model.training and all(m.training for m in model.modules())
    assert len(_nodes(path, "DeformConv")) == 3
    model.eval()
    session = _session(path)
    for n in (1, 4):
        _check(session, model, torch.randn(n, 3, 20, 18))


@pytest.mark.slow
@needs_onnxscript
def test_resnet50_dcn_backbone(tmp_path):
    models = pytest.importorskip("deformable.models")
    if not hasattr(models, "resnet50_dcn"):
        pytest.skip("deformable.models has no resnet50_dcn yet")
    model = _randomise_offsets(models.resnet50_dcn(), std=0.1)
    path = export_onnx(model, torch.randn(2, 3, 48, 48), tmp_path / "r50dcn.onnx")
    assert len(_nodes(path, "DeformConv")) == 13  # every 3x3 conv of conv3-conv5
    session = _session(path)
    for n in (1, 3):
        _check(session, model, torch.randn(n, 3, 48, 48))


@needs_onnxscript
def test_plain_torch_onnx_export_uses_the_registered_translation(tmp_path):
    layer = _randomise_offsets(DCNv2(4, 4, 3, padding=1))
    x = torch.randn(2, 4, 6, 6)
    program = torch.onnx.export(layer, (x,), dynamo=True, opset_version=22, verbose=False)
    path = tmp_path / "plain.onnx"
    program.save(str(path))
    assert len(_nodes(path, "DeformConv")) == 1
    _check(_session(path), layer, x)


# --------------------------------------------------------------------------------------------------
# Deformable RoI pooling: RoiAlign over the moved bins


def _roi_pool_module():
    try:
        module = importlib.import_module("deformable.ops.deform_roi_pool")
    except ImportError:
        pytest.skip("deformable.ops.deform_roi_pool is not available")
    return module


class _RoiPool(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, input, rois, offset, mask):
        return _roi_pool_module().deform_roi_pool(input, rois, offset, mask, **self.kwargs)


def _rois(k, n, size, scale, integer_bins=None):
    start = torch.rand(k, 2) * size / scale
    if integer_bins is None:
        extent = torch.rand(k, 2) * 0.7 * size / scale
    else:  # RoI sizes that make roi_size / output_size an exact integer: the adaptive grid's edge
        start = start.round()
        extent = torch.randint(1, 4, (k, 2)).float() * integer_bins / scale
    batch = torch.randint(0, n, (k, 1)).float()
    return torch.cat([batch, start, start + extent], dim=1)


@pytest.mark.filterwarnings("ignore:# The axis name")
@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize(("sampling_ratio", "aligned"), [(2, False), (0, True), (0, False)])
def test_deform_roi_pool_op(tmp_path, sampling_ratio, aligned, dynamo):
    _roi_pool_module()
    model = _RoiPool(output_size=(5, 4), spatial_scale=0.25, sampling_ratio=sampling_ratio, aligned=aligned)
    model.eval()
    integer_bins = None if aligned else 5  # (0, False): RoIs on the adaptive grid's edge

    def inputs(k):
        rois = _rois(k, 2, 24, 0.25, integer_bins)
        return torch.randn(2, 3, 24, 24), rois, torch.randn(k, 2, 5, 4), torch.rand(k, 1, 5, 4)

    path = tmp_path / "roi.onnx"
    names = ["input", "rois", "offset", "mask"]
    if dynamo:
        n, k = torch.export.Dim("n"), torch.export.Dim("k")
        program = torch.onnx.export(
            model, inputs(6), dynamo=True, verbose=False, input_names=names,
            dynamic_shapes=({0: n}, {0: k}, {0: k}, {0: k}),
        )  # fmt: skip
        program.save(str(path))
    else:
        axes = {"input": {0: "n"}, "rois": {0: "k"}, "offset": {0: "k"}, "mask": {0: "k"}, "output": {0: "k"}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, inputs(6), str(path), dynamo=False, opset_version=19, input_names=names,
                output_names=["output"], dynamic_axes=axes,
            )  # fmt: skip
    assert len(_nodes(path, "RoiAlign")) == 1
    session = _session(path)
    for k in (30, 7):
        _check(session, model, *inputs(k))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_modulated_deform_roi_pool_module(tmp_path, dynamo):
    _roi_pool_module()
    from deformable.nn.deform_roi_pool import ModulatedDeformRoIPool

    pool = ModulatedDeformRoIPool(
        4, spatial_scale=0.5, sampling_ratio=2, in_channels=3, hidden_channels=(16,)
    )
    with torch.no_grad():
        pool.offset_mask_fc[-1].weight.normal_(0, 0.3)
    pool.eval()
    x, rois = torch.randn(2, 3, 16, 16), _rois(5, 2, 16, 0.5)
    path = export_onnx(pool, (x, rois), tmp_path / "mdpool.onnx", dynamic_batch=False, dynamo=dynamo)
    assert len(_nodes(path, "RoiAlign")) == 2  # plain pooling for the branch, then the deformable one
    _check(_session(path), pool, torch.randn(2, 3, 16, 16), _rois(5, 2, 16, 0.5))


# --------------------------------------------------------------------------------------------------
# Errors and the command line


@torch.library.custom_op("deformable::_export_test_unsupported", mutates_args=())
def _unsupported(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_unsupported.register_fake
def _(x):
    return torch.empty_like(x)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_unsupported_deformable_op_is_named(tmp_path, dynamo):
    class Model(nn.Module):
        def forward(self, x):
            return _unsupported(x)

    with pytest.raises(UnsupportedOperatorError, match="deformable::_export_test_unsupported"):
        export_onnx(Model(), torch.randn(2, 3), tmp_path / "x.onnx", dynamo=dynamo)
    assert not list(tmp_path.iterdir())


def test_argument_errors(tmp_path):
    layer, x, out = DCNv1(2, 2, 3), torch.randn(2, 2, 5, 5), tmp_path / "x.onnx"
    with pytest.raises(ValueError, match="opset must be >= 19"):
        export_onnx(layer, x, out, opset=18)
    with pytest.raises(TypeError, match="opset"):
        export_onnx(layer, x, out, opset=True)
    with pytest.raises(TypeError, match="dynamo"):
        export_onnx(layer, x, out, dynamo="yes")
    with pytest.raises(TypeError, match="example_inputs"):
        export_onnx(layer, x.numpy(), out)
    with pytest.raises(ValueError, match="opset must be <= 20"):
        export_onnx(layer, x, out, opset=21, dynamo=False)
    with pytest.raises(ValueError, match="opset must be <= "):  # was found only after the whole export
        export_onnx(layer, x, out, opset=10**6)
    with pytest.raises(ValueError, match="path must be a file"):
        export_onnx(layer, x, tmp_path)
    with pytest.raises(ValueError, match="share"):
        export_onnx(DeformConv2d(2, 2, 3), (x, torch.randn(3, 18, 3, 3)), out)
    with pytest.raises(ValueError, match="input_names"):
        export_onnx(layer, x, out, input_names=["a", "b"], dynamo=False)
    with pytest.raises(TypeError, match="input_names must be a sequence of str"):
        export_onnx(layer, x, out, input_names=5, dynamo=False)
    with pytest.raises(ValueError, match="batch of 0"):  # was torch.export's "Constraints violated"
        export_onnx(layer, x[:0], out)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"blocker is a file, not a folder"):  # was FileExistsError
        export_onnx(layer, x, blocker / "x.onnx")
    assert not out.exists()


def _parser():
    import argparse

    parser = argparse.ArgumentParser(prog="deformable")
    add_cli(parser.add_subparsers(dest="command", required=True))
    return parser


@needs_onnxscript
def test_cli_export_demo_layer_checkpoint(tmp_path):
    layer = _randomise_offsets(DCNv2(16, 32, 3, padding=1))
    checkpoint = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), checkpoint)
    out = tmp_path / "demo.onnx"
    args = _parser().parse_args(
        ["export", "--model", "dcnv2-layer-demo", "--checkpoint", str(checkpoint), "--out", str(out)]
    )
    assert args.func(args) == 0
    _check(_session(out), layer, torch.randn(3, 16, 20, 20))


def test_cli_resnet50_dcn_needs_a_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "r.onnx")
    args = _parser().parse_args(["export", "--model", "resnet50_dcn", "--out", out])
    assert args.func(args) == 2
    assert "needs --checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"not a checkpoint", "is not a readable checkpoint file"),
        ({}, "holds no state dict"),
    ],
)
def test_cli_export_rejects_a_bad_checkpoint_with_a_clear_error(tmp_path, capsys, content, message):
    checkpoint = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        checkpoint.write_bytes(content)
    elif content is not None:
        torch.save(content, checkpoint)
    out = tmp_path / "demo.onnx"
    args = _parser().parse_args(
        ["export", "--model", "dcnv2-layer-demo", "--checkpoint", str(checkpoint), "--out", str(out)]
    )
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert message in err and str(checkpoint) in err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("roi_pool", ["mdpool", "align"])
def test_detector_with_deformable_roi_pooling_exports_with_torchscript(tmp_path, roi_pool):
    """The README's claim: torchvision's Faster R-CNN with a DCN backbone and deformable RoI heads
    exports with the TorchScript exporter. Tracing hands the RoI pooler 0-d tensors as image sizes,
    which its argument check refused."""
    models = pytest.importorskip("deformable.models")
    torch.manual_seed(0)
    model = models.fasterrcnn_resnet50_fpn_dcn(
        num_classes=3, backbone="resnet18", dcn_stages=(5,), roi_pool=roi_pool, min_size=64, max_size=96,
        box_score_thresh=0.0,
    )  # fmt: skip
    model = _randomise_offsets(model, std=0.1)
    image = torch.rand(3, 64, 80)
    path = tmp_path / "detector.onnx"
    torch.onnx.export(model, ([image],), str(path), dynamo=False, opset_version=19)
    assert len(_nodes(path, "DeformConv")) == 4  # the 3x3 convs of conv5 (two basic blocks)
    with torch.no_grad():
        (expected,) = model([image])
    boxes, labels, scores = _session(path).run(None, {_session(path).get_inputs()[0].name: image.numpy()})
    assert boxes.shape == tuple(expected["boxes"].shape) and len(boxes) > 0
    np.testing.assert_allclose(boxes, expected["boxes"].numpy(), atol=1e-3)
    np.testing.assert_allclose(scores, expected["scores"].numpy(), atol=1e-5)
    assert (labels == expected["labels"].numpy()).all()
