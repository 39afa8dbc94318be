"""Faster / Mask R-CNN with DCN: every variant trains and predicts; mimicking is training-only."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torchvision.models.resnet import Bottleneck, ResNet

from deformable.models import (
    count_dcn_layers,
    count_parameters,
    fasterrcnn_resnet50_c4_dcn,
    fasterrcnn_resnet50_fpn_dcn,
    maskrcnn_resnet50_c4_dcn,
    maskrcnn_resnet50_fpn_dcn,
    roi_pooler,
)
from deformable.nn import MultiScaleDeformRoIPool

BUILDERS = {
    ("faster", "fpn"): fasterrcnn_resnet50_fpn_dcn,
    ("mask", "fpn"): maskrcnn_resnet50_fpn_dcn,
    ("faster", "c4"): fasterrcnn_resnet50_c4_dcn,
    ("mask", "c4"): maskrcnn_resnet50_c4_dcn,
}
# The paper's rows: regular with aligned RoI pooling; DCNv1 = conv5 + dpool; DCNv2 = conv3-5 + mdpool.
VARIANTS = {
    "regular": dict(dcn=None, roi_pool="align"),
    "v1-dpool": dict(dcn="v1", dcn_stages=(5,), roi_pool="dpool"),
    "v2-mdpool": dict(dcn="v2", roi_pool="mdpool"),
    "v2-mdpool-mimic": dict(dcn="v2", roi_pool="mdpool", mimic=True),
}


def _small_bottleneck_resnet() -> ResNet:
    """A one-block-per-stage bottleneck ResNet, dilated conv5 (valid for both layouts)."""
    return ResNet(
        Bottleneck, [1, 1, 1, 1], width_per_group=16, replace_stride_with_dilation=[False, False, True]
    )


def build(kind: str, layout: str, **variant):
    torch.manual_seed(0)
    options = dict(
        num_classes=4,
        backbone="resnet18" if layout == "fpn" else _small_bottleneck_resnet(),
        min_size=96,
        max_size=128,
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        box_batch_size_per_image=64,
    )
    if variant.get("roi_pool", "mdpool") != "align":
        options["roi_pool_options"] = dict(
            hidden_channels=(64, 64) if variant.get("roi_pool") != "dpool" else (64,)
        )
    if variant.get("mimic"):
        options["mimic_options"] = dict(rois_per_image=4, patch_size=64)
    options.update(variant)
    return BUILDERS[(kind, layout)](**options)


def batch(with_masks: bool):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 112, generator=g), torch.rand(3, 100, 96, generator=g)]
    boxes = [
        torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 40.0, 100.0, 90.0]]),
        torch.tensor([[8.0, 6.0, 70.0, 80.0]]),
    ]
    labels = [torch.tensor([1, 3]), torch.tensor([2])]
    targets = []
    for image, b, lab in zip(images, boxes, labels, strict=True):
        target = {"boxes": b, "labels": lab}
        if with_masks:
            masks = torch.zeros(len(b), *image.shape[1:], dtype=torch.uint8)
            for m, (x1, y1, x2, y2) in zip(masks, b.long().tolist(), strict=True):
                m[y1 + 5 : y2 - 5, x1 + 5 : x2 - 5] = 1
            target["masks"] = masks
        # Objects of a fixed brightness so that there is something to learn.
        for x1, y1, x2, y2 in b.long().tolist():
            image[:, y1:y2, x1:x2] = 0.9
        targets.append(target)
    return images, targets


def _loss(model, images, targets) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(123)  # the same anchor and RoI sampling for every evaluation
    losses = model(images, targets)
    return sum(losses.values()), losses


# Every pair of (variant, kind), (variant, layout) and (kind, layout) in 8 detectors, not all 16.
PAIRWISE = [
    (variant, kind, layout)
    for i, variant in enumerate(VARIANTS)
    for kind, layout in ((("faster", "fpn"), ("mask", "c4")), (("mask", "fpn"), ("faster", "c4")))[i % 2]
]


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "kind", "layout"), PAIRWISE)
def test_training_reduces_loss_and_eval_is_well_formed(variant, kind, layout):
    model = build(kind, layout, **VARIANTS[variant])
    images, targets = batch(kind == "mask")
    model.train()
    before, losses = _loss(model, images, targets)
    if VARIANTS[variant].get("mimic"):
        assert {"loss_mimic", "loss_rcnn_cls"} <= set(losses)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    for _ in range(5):
        optimizer.zero_grad()
        _loss(model, images, targets)[0].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)  # batch norm on 2 images is jumpy
        optimizer.step()
    after, _ = _loss(model, images, targets)
    assert after.item() < before.item()
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs, strict=True):
        n = out["boxes"].shape[0]
        assert out["boxes"].shape == (n, 4) and out["scores"].shape == (n,) and out["labels"].shape == (n,)
        assert torch.isfinite(out["boxes"]).all()
        assert (out["boxes"][:, 2:] >= out["boxes"][:, :2]).all()
        assert (out["boxes"][:, 2] <= image.shape[2] + 1e-3).all() and (
            out["boxes"][:, 3] <= image.shape[1] + 1e-3
        ).all()
        if kind == "mask":
            assert out["masks"].shape == (n, 1, *image.shape[1:])


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_mimicking_changes_nothing_at_inference(kind):
    plain = build(kind, "fpn", mimic=False)
    mimic = build(kind, "fpn", mimic=True)
    missing, unexpected = mimic.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("mimic.") for k in missing)
    # Built with the same seed, the shared modules start identical even without loading.
    shared = {k: v for k, v in mimic.state_dict().items() if not k.startswith("mimic.")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in shared.items())
    images, _ = batch(kind == "mask")
    plain.eval()
    mimic.eval()
    with torch.no_grad():
        a, b = plain(images), mimic(images)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key])


@pytest.mark.parametrize("select", ["foreground", "all", "background"])
def test_mimicking_selection(select):
    model = build(
        "faster", "fpn", mimic=True, mimic_options=dict(rois_per_image=3, patch_size=64, select=select)
    )
    images, targets = batch(False)
    model.train()
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_mimic"]) and torch.isfinite(losses["loss_rcnn_cls"])
    sum(losses.values()).backward()
    assert model.mimic.classifier.weight.grad is not None


def test_mimicking_patches_leave_the_running_statistics_alone():
    """With batch norms that track statistics (norm_layer=BatchNorm2d), the magnified RoI patches went
    through the shared backbone in training mode and moved the running averages evaluation uses."""
    plain = build("faster", "fpn", norm_layer=torch.nn.BatchNorm2d)
    mimic = build("faster", "fpn", mimic=True, norm_layer=torch.nn.BatchNorm2d)
    mimic.load_state_dict(plain.state_dict(), strict=False)
    images, targets = batch(False)
    for model in (plain, mimic):
        model.train()
        torch.manual_seed(1)
        model(images, targets)
    stats = {k: v for k, v in plain.backbone.state_dict().items() if "running" in k or "num_batches" in k}
    assert stats and any(v.abs().sum() > 0 for k, v in stats.items() if "running_mean" in k)
    for key, value in stats.items():
        torch.testing.assert_close(mimic.backbone.state_dict()[key], value, msg=key)
    norm = next(m for m in mimic.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert norm.momentum == 0.1


def test_mimicking_keeps_nothing_of_a_training_step():
    """After a step the mimicking head holds no tensor of the step's graph: the model deep-copies (EMA,
    SWA, a copy for evaluation) and the step's activations are freed."""
    model = build("faster", "fpn", mimic=True)
    images, targets = batch(False)
    model.train()
    sum(model(images, targets).values()).backward()
    assert not model.mimic._recorded
    copied = copy.deepcopy(model)
    assert torch.equal(copied.mimic.classifier.weight, model.mimic.classifier.weight)


@pytest.mark.parametrize("dcn", [None, "v2"])
def test_c4_layout_dilates_every_3x3_convolution_of_conv5(dcn):
    """The paper's conv5 (and mmdetection's and detectron2's dilated layouts) dilates all its 3x3
    convolutions by 2; torchvision's replace_stride_with_dilation left the first block's at 1."""
    model = build("faster", "c4", dcn=dcn, roi_pool="align")
    convs = [
        m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    body = model.backbone.body if hasattr(model.backbone, "body") else model.backbone
    conv5 = [
        m
        for name, m in body.named_modules()
        if "layer4" in name and getattr(m, "kernel_size", None) == (3, 3)
    ]
    assert conv5 and all(m.dilation == (2, 2) and m.padding == (2, 2) for m in conv5)
    assert all(m.dilation == (1, 1) for m in convs if m not in conv5)
    if dcn is not None:
        assert any(hasattr(m, "conv_offset") for m in conv5)
    model.eval()
    with torch.no_grad():
        model([torch.rand(3, 96, 120)])


def test_placement_of_deformable_parts():
    model = build("mask", "fpn", dcn="v2", roi_pool="mdpool")
    assert count_dcn_layers(model.backbone.body) == 12  # resnet18: 2 blocks x two 3x3 convs x conv3-5
    assert isinstance(model.roi_heads.box_roi_pool, MultiScaleDeformRoIPool)
    assert isinstance(model.roi_heads.mask_roi_pool, MultiScaleDeformRoIPool)
    assert model.roi_heads.mask_roi_pool.output_size == (14, 14)
    c4 = build("faster", "c4", dcn="v2", roi_pool="dpool")
    assert c4.roi_heads.box_roi_pool.featmap_names == ["roi"]
    assert c4.rpn.feature == "rpn" and c4.rpn.head.conv[0][0].in_channels == 1024


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(roi_pool="max"), "roi_pool"),
        (dict(backbone="vgg16"), "backbone"),
        (dict(mimic_options=dict(rois_per_image=2)), "mimic"),
        (dict(mimic=True, mimic_options=dict(select="some")), "select"),
        (dict(trainable_backbone_layers=7), "trainable_backbone_layers"),
    ],
)
def test_bad_detector_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        fasterrcnn_resnet50_fpn_dcn(num_classes=3, **{"backbone": "resnet18", **kwargs})


def test_c4_needs_a_bottleneck_resnet():
    with pytest.raises(ValueError, match="bottleneck"):
        fasterrcnn_resnet50_c4_dcn(num_classes=3, backbone="resnet18")


@pytest.mark.parametrize(
    "num_classes, error", [("5", TypeError), (True, TypeError), (2.0, TypeError), (0, ValueError)]
)
@pytest.mark.parametrize("layout", ["fpn", "c4"])
def test_num_classes_must_be_a_positive_int(layout, num_classes, error):
    with pytest.raises(error, match="num_classes"):
        BUILDERS[("faster", layout)](num_classes=num_classes, backbone="resnet50")


@pytest.mark.parametrize("kind", ["faster", "mask"])
@pytest.mark.parametrize("layout", ["fpn", "c4"])
def test_unknown_keyword_arguments_are_rejected(kind, layout):
    with pytest.raises(TypeError, match=r"\['foo'\].*min_size"):
        BUILDERS[(kind, layout)](num_classes=3, backbone="resnet50", foo=1)


def test_mask_keywords_belong_to_mask_rcnn_only():
    with pytest.raises(TypeError, match=r"\['mask_head'\]"):
        fasterrcnn_resnet50_fpn_dcn(num_classes=3, backbone="resnet18", mask_head=None)


def test_c4_takes_a_one_level_anchor_generator():
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    anchors = AnchorGenerator(((64, 128),), ((0.5, 1.0, 2.0, 4.0),))
    model = build("faster", "c4", dcn=None, roi_pool="align", rpn_anchor_generator=anchors)
    assert model.rpn.anchor_generator is anchors
    assert model.rpn.head.cls_logits.out_channels == 8
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 96, 112)])
    assert out["boxes"].shape[1] == 4


def test_c4_rejects_a_multi_level_anchor_generator():
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    anchors = AnchorGenerator(((32,), (64,)), ((1.0,), (1.0,)))
    with pytest.raises(ValueError, match="rpn_anchor_generator"):
        fasterrcnn_resnet50_c4_dcn(num_classes=3, rpn_anchor_generator=anchors)


def test_c4_keeps_a_given_rpn_head():
    from torchvision.models.detection.rpn import RPNHead

    head = RPNHead(1024, 15)  # conv4 channels, anchors of the default generator
    model = build("faster", "c4", dcn=None, roi_pool="align", rpn_head=head)
    assert model.rpn.head is head


@pytest.fixture(scope="module")
def training_detectors():
    """A small Faster and Mask R-CNN in training mode (only argument checks run on them)."""
    torch.manual_seed(0)
    options = dict(
        num_classes=3, backbone="resnet18", dcn=None, roi_pool="align", min_size=64, max_size=64,
        rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=20, box_batch_size_per_image=16,
    )  # fmt: skip
    return {
        "faster": fasterrcnn_resnet50_fpn_dcn(**options).train(),
        "mask": maskrcnn_resnet50_fpn_dcn(**options).train(),
    }


_BOX = torch.tensor([[1.0, 2.0, 30.0, 40.0]])
_TARGET = {"boxes": _BOX, "labels": torch.tensor([1])}


@pytest.mark.parametrize(
    "targets, error, words",
    [
        (None, ValueError, "targets must be given in training mode"),
        (_TARGET, TypeError, "targets must be a list of dicts"),
        ([_TARGET, _TARGET], ValueError, r"targets must hold one dict per image \(1\), got 2"),
        ([torch.zeros(1, 4)], TypeError, r"targets\[0\] must be a dict"),
        ([{"boxes": _BOX}], ValueError, r"targets\[0\] lacks \['labels'\]"),
        ([{"labels": torch.tensor([1])}], ValueError, r"targets\[0\] lacks \['boxes'\]"),
        ([{**_TARGET, "boxes": _BOX[0]}], ValueError, r"targets\[0\]\['boxes'\] must be a \[N, 4\] tensor"),
        ([{**_TARGET, "boxes": [[1.0, 2.0, 30.0, 40.0]]}], ValueError, r"targets\[0\]\['boxes'\]"),
        ([{**_TARGET, "boxes": torch.zeros(1, 5)}], ValueError, r"targets\[0\]\['boxes'\]"),
        ([{**_TARGET, "boxes": torch.tensor([[5.0, 5, 5, 10]])}], ValueError, r"\['boxes'\] must be finite"),
        ([{**_TARGET, "boxes": torch.tensor([[math.nan, 5, 8, 10]])}], ValueError, r"\['boxes'\] must be"),
        (
            [{**_TARGET, "labels": torch.tensor([1, 2])}],
            ValueError,
            r"targets\[0\]\['labels'\] must be a \[1\]",
        ),
        ([{**_TARGET, "labels": [1]}], ValueError, r"targets\[0\]\['labels'\]"),
        ([{**_TARGET, "labels": torch.tensor([1.0])}], TypeError, r"targets\[0\]\['labels'\] must be int64"),
        (
            [{**_TARGET, "labels": torch.tensor([3])}],
            ValueError,
            r"\['labels'\] must be foreground class indices in \[1, 2\]",
        ),
        # 0 is the background: the RPN would learn the box as an object, the box head against it
        (
            [{**_TARGET, "labels": torch.tensor([0])}],
            ValueError,
            r"\['labels'\] must be foreground class indices in \[1, 2\] \(0 is the background\)",
        ),
    ],
)
def test_training_targets_are_checked_upfront(training_detectors, targets, error, words):
    # These were torchvision asserts, KeyErrors, IndexErrors, or (NaN boxes, too many labels, one target
    # too many) silently accepted.
    with pytest.raises(error, match=words):
        training_detectors["faster"]([torch.rand(3, 64, 64)], targets)


@pytest.mark.parametrize(
    "masks, words",
    [
        (None, r"lacks \['masks'\]"),
        (torch.zeros(64, 64), r"\['masks'\] must be a \[1, 64, 64\] tensor"),
        (torch.zeros(2, 64, 64), r"\['masks'\] must be a \[1, 64, 64\] tensor"),
        (torch.zeros(1, 32, 32), r"\['masks'\] must be a \[1, 64, 64\] tensor .* at the image's size"),
    ],
)
def test_mask_rcnn_targets_need_one_mask_per_box(training_detectors, masks, words):
    # A [H, W] mask crashed inside a C++ kernel with "Dimension out of range"; masks at another size
    # than their image trained on misaligned masks (torchvision scales them by the image's factor).
    target = dict(_TARGET) if masks is None else {**_TARGET, "masks": masks}
    with pytest.raises(ValueError, match=words):
        training_detectors["mask"]([torch.rand(3, 64, 64)], [target])


def test_detector_images_are_checked(training_detectors):
    with pytest.raises(ValueError, match=r"images\[0\] must be a \[C, H, W\] tensor"):
        training_detectors["faster"](["image"], [_TARGET])
    with pytest.raises(TypeError, match="images must be a list"):
        training_detectors["faster"]("image", [_TARGET])


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(norm_layer="batchnorm"), TypeError, "norm_layer must be None or a callable"),
        (dict(norm_layer=torch.nn.BatchNorm2d(3)), TypeError, "norm_layer"),
        (
            dict(backbone=ResNet(Bottleneck, [1, 1, 1, 1]), norm_layer=torch.nn.BatchNorm2d),
            ValueError,
            "norm_layer",
        ),
        (dict(backbone=[]), ValueError, "backbone must be one of"),
        (dict(roi_pool_options=3), TypeError, "roi_pool_options must be a dict"),
        (dict(mimic=True, mimic_options=3), TypeError, "mimic_options must be"),
        (dict(mimic="no"), TypeError, "mimic must be a bool"),
        (dict(trainable_backbone_layers=True), ValueError, "trainable_backbone_layers"),
    ],
)
def test_bad_detector_argument_types(kwargs, error, words):
    with pytest.raises(error, match=words):
        fasterrcnn_resnet50_fpn_dcn(num_classes=3, **{"backbone": "resnet18", **kwargs})


@pytest.mark.parametrize("roi_channels, error", [(0, ValueError), ("256", TypeError)])
def test_c4_roi_channels_is_checked(roi_channels, error):
    # 0 was reported as "in_channels"; a string failed in torch's string formatting.
    with pytest.raises(error, match="roi_channels"):
        fasterrcnn_resnet50_c4_dcn(num_classes=3, roi_channels=roi_channels)


def test_roi_pooler_output_size_is_checked():
    with pytest.raises(ValueError, match="output_size"):
        roi_pooler("align", ["0"], 0, 256)  # RoIAlign accepted it and pooled nothing
    assert roi_pooler("align", ["0"], 7, 256).output_size == (7, 7)


def test_upfront_checks_accept_what_torchvision_accepts(training_detectors):
    # A tuple of targets, integer boxes, no boxes, a [B, C, H, W] batch (the slow training tests run the
    # usual form end to end).
    from deformable.models.detection import _check_images, _check_targets

    images = torch.rand(2, 3, 64, 64)
    targets = (
        {"boxes": torch.tensor([[1, 2, 30, 40]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    )
    _check_images(images)
    _check_targets(training_detectors["faster"], images, targets)


def test_count_parameters_wants_a_module():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        count_parameters("model")  # was an AttributeError


@pytest.mark.parametrize(
    ("dcn", "layers", "pool"),
    [("v2", 13, "ModulatedDeformRoIPool"), ("v1", 3, "DeformRoIPool"), (None, 0, "MultiScaleRoIAlign")],
)
def test_builder_defaults_follow_the_papers_rows(dcn, layers, pool):
    """Left out, dcn_stages and roi_pool follow dcn: DCNv2 conv3-5 + mdpool, DCNv1 conv5 + dpool, a
    regular network + RoIAlign (the three rows of the paper's ablation)."""
    from deformable.nn import DCNv1, DCNv2

    model = fasterrcnn_resnet50_fpn_dcn(num_classes=3, dcn=dcn, backbone="resnet50", min_size=64, max_size=64)
    dcn_layers = [m for m in model.backbone.body.modules() if isinstance(m, DCNv1 | DCNv2)]
    assert len(dcn_layers) == layers
    box_pool = model.roi_heads.box_roi_pool
    names = {type(m).__name__ for m in box_pool.modules()}
    assert pool in names
    if dcn == "v2":
        assert "DeformRoIPool" not in names
