"""DeformRoIPool, ModulatedDeformRoIPool and MultiScaleDeformRoIPool."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from deformable.nn.deform_roi_pool import DeformRoIPool, ModulatedDeformRoIPool, MultiScaleDeformRoIPool


def make_rois(num, height, width, batch=2, scale=1.0):
    size = torch.tensor([width, height]) / scale
    top_left = torch.rand(num, 2) * size * 0.7
    extent = torch.rand(num, 2) * size * 0.5 + 1.0
    index = torch.randint(0, batch, (num, 1)).float()
    return torch.cat([index, top_left, top_left + extent], dim=1)


def make_boxes(num, image_height, image_width):
    centre = torch.rand(num, 2) * torch.tensor([image_width, image_height])
    size = torch.exp(torch.empty(num, 2).uniform_(2.5, 6.5))  # 12 to 660 pixels
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image_width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image_height)
    return boxes


def fpn(batch=2, channels=8, image=(256, 320)):
    return OrderedDict(
        (name, torch.randn(batch, channels, image[0] // stride, image[1] // stride))
        for name, stride in (("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32))
    )


@pytest.mark.parametrize("aligned", [False, True])
def test_deform_roi_pool_starts_as_roi_align(aligned):
    x = torch.randn(2, 4, 16, 20)
    rois = make_rois(9, 16, 20, scale=0.5)
    module = DeformRoIPool(7, 0.5, 2, in_channels=4, hidden_channels=(32,), aligned=aligned)
    torch.testing.assert_close(module(x, rois), roi_align(x, rois, 7, 0.5, 2, aligned))


@pytest.mark.parametrize("branch", ["paper", "mmcv"])
def test_modulated_starts_as_half_roi_align(branch):
    x = torch.randn(2, 4, 16, 20)
    rois = make_rois(9, 16, 20, scale=0.5)
    module = ModulatedDeformRoIPool((7, 5), 0.5, 0, in_channels=4, hidden_channels=(32, 16), branch=branch)
    offset, mask = module.predict(module.pool(x, rois))
    assert torch.equal(offset, torch.zeros(9, 2, 7, 5))
    assert torch.equal(mask, torch.full((9, 1, 7, 5), 0.5))
    aligned = branch == "mmcv"  # mmcv's op samples half a pixel shifted
    torch.testing.assert_close(module(x, rois), 0.5 * roi_align(x, rois, (7, 5), 0.5, 0, aligned))


def test_mmcv_branch_state_dict_names():
    module = ModulatedDeformRoIPool(7, 1 / 16, in_channels=256, branch="mmcv")
    shapes = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    assert shapes == {
        "offset_fc.0.weight": (1024, 256 * 49),
        "offset_fc.0.bias": (1024,),
        "offset_fc.2.weight": (1024, 1024),
        "offset_fc.2.bias": (1024,),
        "offset_fc.4.weight": (98, 1024),
        "offset_fc.4.bias": (98,),
        "mask_fc.0.weight": (1024, 256 * 49),
        "mask_fc.0.bias": (1024,),
        "mask_fc.2.weight": (49, 1024),
        "mask_fc.2.bias": (49,),
    }
    # DCNv1's default is the paper's single fc: pooled features -> 2K normalised offsets.
    single = DeformRoIPool(7, in_channels=16)
    assert [tuple(p.shape) for p in single.offset_fc.parameters()] == [(98, 16 * 49), (98,)]
    # DCNv1 with two hidden layers has the names of mmcv's DeformRoIPoolPack.
    v1 = DeformRoIPool(7, in_channels=16, hidden_channels=(64, 64))
    assert list(v1.state_dict()) == [f"offset_fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    # The paper's single branch: 3K outputs, hidden layers Gaussian std 0.01.
    paper = ModulatedDeformRoIPool(7, in_channels=16)
    assert [tuple(p.shape) for p in paper.offset_mask_fc.parameters()] == [
        (1024, 16 * 49),
        (1024,),
        (1024, 1024),
        (1024,),
        (147, 1024),
        (147,),
    ]
    assert abs(paper.offset_mask_fc[2].weight.std().item() - 0.01) < 1e-3


def test_loads_mmcv_layout_by_name_and_uses_both_branches():
    source = ModulatedDeformRoIPool(3, in_channels=4, hidden_channels=(8, 8), branch="mmcv")
    for p in source.parameters():
        torch.nn.init.normal_(p, std=0.5)
    target = ModulatedDeformRoIPool(3, in_channels=4, hidden_channels=(8, 8), branch="mmcv")
    target.load_state_dict(source.state_dict())
    x, rois = torch.randn(2, 4, 10, 10), make_rois(5, 10, 10)
    torch.testing.assert_close(target(x, rois), source(x, rois))
    offset, mask = target.predict(target.pool(x, rois))
    flat = target.pool(x, rois).flatten(1)
    torch.testing.assert_close(offset.flatten(1), target.offset_fc(flat))
    torch.testing.assert_close(mask.flatten(1), target.mask_fc(flat))


def test_learning_rate_multipliers():
    assert DeformRoIPool.offset_lr_mult == 0.01
    assert ModulatedDeformRoIPool.offset_lr_mult == 1.0
    v1 = DeformRoIPool(7, in_channels=4, hidden_channels=(8,))
    assert {id(p) for p in v1.offset_parameters()} == {id(p) for p in v1.parameters()}
    ms = MultiScaleDeformRoIPool(["p2"], 7, 2, in_channels=4, modulated=False, hidden_channels=(8,))
    assert ms.offset_lr_mult == 0.01
    assert len(list(ms.offset_parameters())) == 4


@pytest.mark.parametrize("modulated", [False, True])
def test_gradients_reach_the_offset_branch(modulated):
    cls = ModulatedDeformRoIPool if modulated else DeformRoIPool
    module = cls(4, 0.5, 2, in_channels=3, hidden_channels=(16, 16) if modulated else (16,))
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    rois = make_rois(6, 12, 12, scale=0.5)
    module(x, rois).square().sum().backward()
    last = module.offset_mask_fc[-1] if modulated else module.offset_fc[-1]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Once the last layer is non-zero, the gradient flows to the hidden layers too.
    with torch.no_grad():
        last.weight.normal_(std=0.01)
    module.zero_grad()
    module(x, rois).square().sum().backward()
    assert module.offset_parameters().__next__().grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "aten"])
def test_module_backends_agree(backend):
    module = ModulatedDeformRoIPool(3, 0.5, 0, in_channels=3, hidden_channels=(8, 8)).double()
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    rois = make_rois(4, 10, 10, scale=0.5).double()
    module.backend = backend
    got = module(x, rois)
    module.backend = "reference"
    torch.testing.assert_close(got, module(x, rois), rtol=1e-10, atol=1e-10)


def test_compile_fullgraph_module():
    module = ModulatedDeformRoIPool(4, 0.5, 2, in_channels=3, hidden_channels=(16, 16))
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    rois = make_rois(5, 12, 12, scale=0.5)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    got = compiled(x, rois)
    expected = module(x, rois)
    torch.testing.assert_close(got, expected)
    (grad_compiled,) = torch.autograd.grad(got.sum(), x)
    (grad_eager,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad_compiled, grad_eager)


# ------------------------------------------------------------------------------------------------
# MultiScaleDeformRoIPool
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("output_size", [7, (14, 14)])
def test_multiscale_is_multiscale_roi_align_at_start(modulated, share, output_size):
    features = fpn()
    boxes = [make_boxes(20, 256, 320), make_boxes(13, 256, 320)]
    image_shapes = [(256, 320), (240, 300)]
    names = ["p2", "p3", "p4", "p5"]
    expected = MultiScaleRoIAlign(names, output_size, 2)(features, boxes, image_shapes)
    ours = MultiScaleDeformRoIPool(
        names, output_size, 2, in_channels=8, modulated=modulated, share_offset_branch=share,
        hidden_channels=(16, 16) if modulated else (16,),
    )  # fmt: skip
    got = ours(features, boxes, image_shapes)
    torch.testing.assert_close(got, expected * (0.5 if modulated else 1.0))
    assert len(ours.pools) == (1 if share else 4)


@pytest.mark.parametrize(
    ("box", "error", "match"),
    [
        ([float("nan"), 1.0, 30.0, 30.0], ValueError, "boxes must be finite"),  # maps to no level
        ([1, 1, 30, 30], TypeError, "boxes must be floating-point"),
    ],
)
def test_multiscale_rejects_nan_and_integer_boxes(box, error, match):
    ms = MultiScaleDeformRoIPool(["0", "1"], 3, 2, in_channels=4, hidden_channels=(8,))
    features = {"0": torch.randn(1, 4, 16, 16), "1": torch.randn(1, 4, 8, 8)}
    boxes = torch.tensor([box, [2, 2, 60, 60]], dtype=torch.float32 if error is ValueError else torch.int64)
    with pytest.raises(error, match=match):
        ms(features, [boxes], [(64, 64)])


def test_multiscale_single_level_and_subset_of_maps():
    features = fpn()
    boxes = [make_boxes(6, 256, 320), make_boxes(4, 256, 320)]
    shapes = [(256, 320)] * 2
    for names in (["p3"], ["p2", "p4"]):
        expected = MultiScaleRoIAlign(names, 5, 0)(features, boxes, shapes)
        ours = MultiScaleDeformRoIPool(names, 5, 0, in_channels=8, modulated=False, hidden_channels=(8,))
        torch.testing.assert_close(ours(features, boxes, shapes), expected)


def test_multiscale_offsets_move_every_level_and_reach_per_level_branches():
    features = {k: v.requires_grad_() for k, v in fpn(batch=1).items()}
    boxes = [make_boxes(30, 256, 320)]
    ours = MultiScaleDeformRoIPool(
        ["p2", "p3", "p4", "p5"], 3, 2, in_channels=8, share_offset_branch=False, hidden_channels=(8, 8)
    )
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.05)
    levels = ours.map_levels
    out = ours(features, boxes, [(256, 320)])
    reference = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 3, 2)(features, boxes, [(256, 320)])
    assert levels is None and ours.map_levels is not None
    assert not torch.allclose(out, 0.5 * reference)
    out.square().sum().backward()
    used = set(ours.map_levels(boxes).tolist())
    for level, branch in enumerate(ours.pools):
        grad = branch.offset_mask_fc[-1].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == (level in used)


def test_multiscale_in_torchvision_roi_heads():
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.roi_heads import RoIHeads

    pool = MultiScaleDeformRoIPool(["p2", "p3", "p4", "p5"], 7, 2, in_channels=8, hidden_channels=(16, 16))
    resolution = pool.output_size[0]
    heads = RoIHeads(
        pool,
        TwoMLPHead(8 * resolution**2, 32),
        FastRCNNPredictor(32, 3),
        0.5,
        0.5,
        64,
        0.25,
        None,
        0.05,
        0.5,
        10,
    )
    heads.eval()
    features = fpn()
    proposals = [make_boxes(15, 256, 320), make_boxes(11, 256, 320)]
    with torch.no_grad():
        detections, losses = heads(features, proposals, [(256, 320), (256, 320)])
    assert len(detections) == 2 and losses == {}
    heads.train()
    targets = [
        {"boxes": make_boxes(3, 256, 320), "labels": torch.tensor([1, 2, 1])},
        {"boxes": make_boxes(2, 256, 320), "labels": torch.tensor([2, 2])},
    ]
    _, losses = heads(features, proposals, [(256, 320), (256, 320)], targets)
    sum(losses.values()).backward()
    assert pool.pools[0].offset_mask_fc[-1].weight.grad is not None


def test_module_under_cpu_autocast():
    module = ModulatedDeformRoIPool(3, 0.5, 2, in_channels=4, hidden_channels=(8, 8))
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 4, 10, 10, requires_grad=True)
    rois = make_rois(5, 10, 10, scale=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, rois)  # the fc branch runs in bf16, the pooling in the features' fp32
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, module(x, rois), rtol=0.05, atol=0.05)
    out.sum().backward()
    assert x.grad is not None and module.offset_mask_fc[0].weight.grad is not None


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="branch"):
        ModulatedDeformRoIPool(7, in_channels=4, branch="detectron")
    with pytest.raises(ValueError, match="hidden_channels"):
        ModulatedDeformRoIPool(7, in_channels=4, hidden_channels=())
    with pytest.raises(ValueError, match="modulated=True"):
        MultiScaleDeformRoIPool(["p2"], 7, 2, in_channels=4, modulated=False, branch="mmcv")
    with pytest.raises(ValueError, match="output_size"):
        DeformRoIPool(0, in_channels=4)
    with pytest.raises(ValueError, match=r"in_channels=4 channels, got 3"):
        DeformRoIPool(7, in_channels=4, hidden_channels=(8,))(torch.randn(1, 3, 8, 8), make_rois(2, 8, 8, 1))
    with pytest.raises(ValueError, match=r"in_channels=4 channels, got 8"):
        MultiScaleDeformRoIPool(["p2"], 7, 2, in_channels=4)(
            fpn(), [make_boxes(2, 256, 320)] * 2, [(256, 320)] * 2
        )


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(aligned="false"), TypeError, "aligned"),
        (dict(sampling_ratio=1.7), TypeError, "sampling_ratio"),
        (dict(in_channels=8.9), TypeError, "in_channels"),
        (dict(in_channels=0), ValueError, "in_channels"),
        (dict(gamma=float("nan")), ValueError, "gamma"),
        (dict(spatial_scale=0.0), ValueError, "spatial_scale"),
        (dict(hidden_channels=16), TypeError, "hidden_channels"),
        (dict(hidden_channels=(16, 0)), ValueError, "hidden_channels"),
        (dict(hidden_channels=(16.5,)), TypeError, "hidden_channels"),
    ],
)
@pytest.mark.parametrize("cls", [DeformRoIPool, ModulatedDeformRoIPool])
def test_pooling_modules_reject_what_the_operator_rejects(cls, kwargs, error, words):
    args = dict(output_size=2, in_channels=4, hidden_channels=(8, 8))
    args.update(kwargs)
    with pytest.raises(error, match=words):
        cls(**args)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(sampling_ratio=1.7), TypeError, "sampling_ratio"),
        (dict(aligned="false"), TypeError, "aligned"),
        (dict(share_offset_branch="no"), TypeError, "share_offset_branch"),
        (dict(modulated=1), TypeError, "modulated"),
        (dict(featmap_names=[]), ValueError, "featmap_names"),
        (dict(featmap_names="p2"), TypeError, "featmap_names"),
        (dict(featmap_names=[2]), ValueError, "featmap_names"),
        (dict(canonical_scale=-5), ValueError, "canonical_scale"),
        (dict(canonical_scale=float("nan")), ValueError, "canonical_scale"),
        (dict(canonical_level=1.5), TypeError, "canonical_level"),
        (dict(canonical_level=0), ValueError, "canonical_level"),
        (dict(sampling_ratio=2**31), ValueError, "sampling_ratio must be at most 4096"),
        (dict(backend="nonsense"), ValueError, "backend must be one of"),
    ],
)
def test_bad_multiscale_arguments(kwargs, error, words):
    args = dict(featmap_names=["p2"], output_size=2, sampling_ratio=2, in_channels=4, hidden_channels=(8,))
    args.update(kwargs)
    with pytest.raises(error, match=words):
        MultiScaleDeformRoIPool(**args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_input_of_another_dtype_names_both_dtypes(dtype):
    module = ModulatedDeformRoIPool(2, in_channels=4, hidden_channels=(8, 8))
    rois = torch.tensor([[0.0, 1.0, 1.0, 5.0, 5.0]], dtype=dtype)
    with pytest.raises(TypeError, match=rf"{dtype}.*torch\.float32"):
        module(torch.randn(1, 4, 8, 8, dtype=dtype), rois)


def test_bad_multiscale_forward_arguments():
    module = MultiScaleDeformRoIPool(["p2", "p3"], 2, 2, in_channels=4, hidden_channels=(8,))
    x = {"p2": torch.randn(1, 4, 16, 16), "p3": torch.randn(1, 4, 8, 8)}
    boxes, shapes = [torch.tensor([[1.0, 1.0, 9.0, 9.0], [2.0, 2.0, 30.0, 30.0]])], [(32, 32)]
    assert module(x, boxes, shapes).shape == (2, 4, 2, 2)
    cases = [
        ((x["p2"], boxes, shapes), TypeError, "x must be a dict"),
        (({"p2": x["p2"]}, boxes, shapes), ValueError, r"no feature map named \['p3'\]"),
        ((x, boxes[0], shapes), TypeError, "boxes must be a list"),
        ((x, [boxes[0][:, :3]], shapes), ValueError, r"boxes must hold \[L_i, 4\]"),
        ((x, boxes, [(32, 32), (32, 32)]), ValueError, "one \\(height, width\\) per image"),
        ((x, boxes, [(0, 32)]), ValueError, "positive ints"),
        ((x, boxes, [32]), ValueError, "positive ints"),
    ]
    for args, error, words in cases:
        with pytest.raises(error, match=words):
            module(*args)
    for name, value in (("offset", torch.zeros(5, 2, 2, 2)), ("mask", torch.zeros(1, 1, 2, 2))):
        with pytest.raises(ValueError, match=rf"{name} must have shape \[2, \d, 2, 2\]"):
            module.pool(x, boxes, shapes, **{name: value})


def test_mmcv_branch_samples_as_mmcv():
    """mmcv's op samples half a pixel shifted (aligned) on an adaptive grid: the mmcv layout does too by
    default, so mmdetection checkpoints pool as they were trained; explicit settings win."""
    from deformable.models import roi_pooler

    assert ModulatedDeformRoIPool(3, in_channels=4, hidden_channels=(8,), branch="mmcv").aligned is True
    assert ModulatedDeformRoIPool(3, in_channels=4, hidden_channels=(8,)).aligned is False
    explicit = ModulatedDeformRoIPool(3, in_channels=4, hidden_channels=(8,), branch="mmcv", aligned=False)
    assert explicit.aligned is False
    mmcv = roi_pooler("mdpool", ["p2"], 7, 4, branch="mmcv", hidden_channels=(8,))
    paper = roi_pooler("mdpool", ["p2"], 7, 4, hidden_channels=(8,))
    assert (mmcv.pools[0].sampling_ratio, mmcv.pools[0].aligned) == (0, True)
    assert (paper.pools[0].sampling_ratio, paper.pools[0].aligned) == (2, False)
