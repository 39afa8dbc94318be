"""Faster and Mask R-CNN with deformable backbones and deformable RoI pooling, on torchvision.

Two layouts:

- FPN (what most users run today): torchvision's ``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn``
  with DCN in the backbone's chosen stages and (modulated) deformable RoI pooling in place of
  ``MultiScaleRoIAlign`` (box 7x7 and, for Mask R-CNN, mask 14x14).
- C4 (the paper's): RPN on conv4 (stride 16); conv5 dilated so it stays at stride 16, reduced to 256
  channels by a 1x1 convolution; RoI pooling on it, then the 2fc 1024 head.

``roi_pool``: "mdpool" (DCNv2's modulated deformable RoI pooling), "dpool" (DCNv1's) or "align"
(RoIAlign, torchvision's default). ``mimic=True`` adds R-CNN feature mimicking to training.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models import ResNet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from ..nn.deform_conv import _check_bool, _positive_int
from ..nn.deform_roi_pool import MultiScaleDeformRoIPool
from ..ops.deform_roi_pool import _output_size
from .backbones import BACKBONES, DCNVersion, check_module, check_norm_layer, convert_resnet_to_dcn
from .mimic import FeatureMimicking, MimicOptions

RoIPoolKind = Literal["mdpool", "dpool", "align"]


def roi_pooler(
    kind: RoIPoolKind,
    featmap_names: list[str],
    output_size: int,
    in_channels: int,
    sampling_ratio: int | None = None,
    **options,
) -> nn.Module:
    """The RoI feature extractor of a torchvision RoIHeads: RoIAlign or (modulated) deformable pooling.

    ``options`` go to :class:`~deformable.nn.MultiScaleDeformRoIPool` (``gamma``, ``hidden_channels``,
    ``share_offset_branch``, ``branch``...). ``sampling_ratio`` defaults to the paper's 2 x 2 samples
    per bin, or to mmcv's adaptive grid (0) with ``branch="mmcv"`` (mmdetection's checkpoints).
    """
    if sampling_ratio is None:
        sampling_ratio = 0 if options.get("branch") == "mmcv" else 2
    if kind == "align":
        if options:
            raise ValueError(f"roi_pool='align' takes no pooling options, got {sorted(options)}")
        return MultiScaleRoIAlign(featmap_names, _output_size(output_size), sampling_ratio)
    if kind not in ("mdpool", "dpool"):
        raise ValueError(f"roi_pool must be 'mdpool', 'dpool' or 'align', got {kind!r}")
    return MultiScaleDeformRoIPool(
        featmap_names,
        output_size,
        sampling_ratio,
        in_channels=in_channels,
        modulated=kind == "mdpool",
        **options,
    )


class _MimickingMixin(nn.Module):
    """Adds the optional R-CNN feature-mimicking branch (``self.mimic``) to a torchvision R-CNN.

    It precedes ``FasterRCNN`` or ``MaskRCNN`` among the bases (the MRO is theirs, the mixin first); the
    annotations name the attributes of theirs it uses.
    """

    mimic: FeatureMimicking | None
    transform: GeneralizedRCNNTransform
    backbone: nn.Module
    rpn: RegionProposalNetwork
    roi_heads: RoIHeads

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """As torchvision's; in training with mimicking, the loss dict also has ``loss_mimic`` and
        ``loss_rcnn_cls``."""
        _check_images(images)
        if self.training:
            _check_targets(self, images, targets)
        if self.mimic is None or not self.training:
            return super().forward(images, targets)
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, proposal_losses = self.rpn(image_list, features, targets)
        with self.mimic.record(self.roi_heads):
            _, detector_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        mimic_losses = self.mimic.losses(self, image_list.tensors)
        return {**detector_losses, **proposal_losses, **mimic_losses}


def _check_images(images) -> None:
    """TypeError/ValueError unless ``images`` is a list of ``[C, H, W]`` tensors (or a ``[B, C, H, W]``
    batch, which torchvision iterates)."""
    if isinstance(images, Tensor) and images.dim() == 4:
        return
    if isinstance(images, Tensor | str) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a list of [C, H, W] tensors, got {type(images).__name__}")
    for index, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3:
            got = list(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"images[{index}] must be a [C, H, W] tensor, got {got}")


def _check_targets(model, images, targets) -> None:
    """Check training ``targets`` upfront (torchvision's own checks are asserts, KeyErrors or none):
    one dict per image with ``boxes`` [N, 4] (finite, x2 > x1, y2 > y1), ``labels`` [N] int64 in
    [1, num_classes) (0 is the background) and, for Mask R-CNN, ``masks`` [N, H, W] at the image's
    own H and W (torchvision scales masks by the image's resize factor, so masks of any other size
    would be cut from the wrong region)."""
    expected = "a list of dicts with 'boxes' [N, 4] and 'labels' [N] (and 'masks' [N, H, W]), one per image"
    if targets is None:
        raise ValueError(f"targets must be given in training mode: {expected}")
    if isinstance(targets, Tensor | str | Mapping) or not isinstance(targets, Sequence):
        raise TypeError(f"targets must be {expected}, got {type(targets).__name__}")
    if len(targets) != len(images):
        raise ValueError(f"targets must hold one dict per image ({len(images)}), got {len(targets)}")
    predictor = getattr(model.roi_heads.box_predictor, "cls_score", None)
    num_classes = getattr(predictor, "out_features", None)
    keys = ("boxes", "labels", "masks") if model.roi_heads.has_mask() else ("boxes", "labels")
    flags = []  # per target: (boxes valid, labels valid), 0-d bool tensors on the data's device
    for index, target in enumerate(targets):
        name = f"targets[{index}]"
        if not isinstance(target, Mapping):
            raise TypeError(f"{name} must be a dict with {keys}, got {type(target).__name__}")
        missing = [key for key in keys if key not in target]
        if missing:
            raise ValueError(f"{name} lacks {missing}: every target needs {keys}")
        boxes, labels = target["boxes"], target["labels"]
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{name}['boxes'] must be a [N, 4] tensor (x1, y1, x2, y2), got {_shape(boxes)}")
        count = boxes.shape[0]
        if not isinstance(labels, Tensor) or labels.shape != (count,):
            raise ValueError(
                f"{name}['labels'] must be a [{count}] tensor (one class per box), got {_shape(labels)}"
            )
        if labels.dtype != torch.int64:
            raise TypeError(f"{name}['labels'] must be int64, got {labels.dtype}")
        if "masks" in keys:
            masks = target["masks"]
            height, width = images[index].shape[-2:]
            if not isinstance(masks, Tensor) or tuple(masks.shape) != (count, height, width):
                raise ValueError(
                    f"{name}['masks'] must be a [{count}, {height}, {width}] tensor (one per box, at the "
                    f"image's size), got {_shape(masks)}"
                )
        valid_boxes = (torch.isfinite(boxes).all(1) & (boxes[:, 2:] > boxes[:, :2]).all(1)).all()
        # 0 is the background: a box labelled 0 would train the RPN on it and the box head against it.
        valid_labels = ((labels >= 1) & (labels < num_classes)).all() if num_classes else valid_boxes
        flags.append(torch.stack([valid_boxes, valid_labels.to(valid_boxes.device)]))
    if not flags:
        return
    valid = torch.stack([flag.to(flags[0].device) for flag in flags])
    if bool(valid.all()):  # one synchronisation for the whole batch
        return
    for index, (boxes_ok, labels_ok) in enumerate(valid.tolist()):
        name = f"targets[{index}]"
        if not boxes_ok:
            raise ValueError(
                f"{name}['boxes'] must be finite with x2 > x1 and y2 > y1, "
                f"got {targets[index]['boxes'].tolist()}"
            )
        if not labels_ok:
            assert num_classes is not None  # without a class count, labels_ok is boxes_ok
            raise ValueError(
                f"{name}['labels'] must be foreground class indices in [1, {num_classes - 1}] (0 is the "
                f"background), "
                f"got {targets[index]['labels'].tolist()}"
            )


def _shape(value) -> str:
    return str(list(value.shape)) if isinstance(value, Tensor) else type(value).__name__


class DCNFasterRCNN(_MimickingMixin, FasterRCNN):
    """torchvision's FasterRCNN with optional R-CNN feature mimicking (``mimic``)."""

    def __init__(self, *args, mimic: FeatureMimicking | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mimic = mimic


class DCNMaskRCNN(_MimickingMixin, MaskRCNN):
    """torchvision's MaskRCNN with optional R-CNN feature mimicking (``mimic``)."""

    def __init__(self, *args, mimic: FeatureMimicking | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mimic = mimic


class FeatureSelectingRPN(RegionProposalNetwork):
    """A RegionProposalNetwork that looks at one named feature map only (C4: conv4)."""

    def __init__(self, feature: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.feature = feature

    def forward(self, images, features, targets=None):
        return super().forward(images, {self.feature: features[self.feature]}, targets)


class C4Backbone(nn.Module):
    """conv1..conv5 of a ResNet with conv5 dilated (stride 16), returning two maps.

    Output: ``{"rpn": conv4 [N, C4, H/16, W/16], "roi": reduced conv5 [N, out_channels, H/16, W/16]}``.
    """

    def __init__(self, resnet: nn.Module, conv4_channels: int, conv5_channels: int, out_channels: int = 256):
        super().__init__()
        self.body = IntermediateLayerGetter(resnet, {"layer3": "rpn", "layer4": "conv5"})
        self.reduce = nn.Sequential(nn.Conv2d(conv5_channels, out_channels, 1), nn.ReLU(inplace=True))
        self.conv4_channels = conv4_channels
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        maps = self.body(x)
        return OrderedDict([("rpn", maps["rpn"]), ("roi", self.reduce(maps["conv5"]))])


def _resnet(
    backbone: str,
    dcn: DCNVersion,
    dcn_stages: Iterable[int],
    offset_groups: int,
    weights_backbone,
    norm_layer,
    replace_stride_with_dilation=None,
):
    if isinstance(backbone, ResNet):
        if weights_backbone is not None or norm_layer is not None:
            raise ValueError(
                "weights_backbone and norm_layer cannot be combined with a ResNet instance as backbone"
            )
        return convert_resnet_to_dcn(backbone, dcn, dcn_stages, offset_groups)
    if not isinstance(backbone, str) or backbone not in BACKBONES:
        raise ValueError(
            f"backbone must be one of {sorted(BACKBONES)} or a torchvision ResNet, got {backbone!r}"
        )
    if norm_layer is None:
        # As torchvision: frozen statistics on top of pretrained weights, batch norm when from scratch.
        norm_layer = FrozenBatchNorm2d if weights_backbone is not None else nn.BatchNorm2d
    return BACKBONES[backbone](
        dcn=dcn,
        dcn_stages=dcn_stages,
        offset_groups=offset_groups,
        weights=weights_backbone,
        norm_layer=norm_layer,
        replace_stride_with_dilation=replace_stride_with_dilation,
    )


def _trainable_layers(value: int | None, pretrained: bool) -> int:
    if value is None:
        return 3 if pretrained else 5
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 5:
        raise ValueError(f"trainable_backbone_layers must be an int in [0, 5], got {value!r}")
    return value


def _mimicking(mimic: bool, mimic_options, model) -> FeatureMimicking | None:
    """The mimicking branch, built last so that every other module is initialised as without it."""
    if not mimic:
        if mimic_options:
            raise ValueError("mimic_options needs mimic=True")
        return None
    options = (
        mimic_options if isinstance(mimic_options, MimicOptions) else MimicOptions(**(mimic_options or {}))
    )
    classifier = model.roi_heads.box_predictor.cls_score
    return FeatureMimicking(classifier.in_features, classifier.out_features, options)


@dataclass(frozen=True)
class _DetectorOptions:
    """The arguments every detector builder shares (see the builders' docstring)."""

    num_classes: int | None
    dcn: DCNVersion
    dcn_stages: Iterable[int]
    offset_groups: int
    roi_pool: RoIPoolKind
    roi_pool_options: dict | None
    mimic: bool
    mimic_options: MimicOptions | dict | None
    backbone: str | ResNet
    weights_backbone: object
    trainable_backbone_layers: int | None
    norm_layer: object

    def __post_init__(self) -> None:
        """Check what would otherwise fail only once the backbone is built (or deep inside it)."""
        num_classes, mimic_options, pool_options = self.num_classes, self.mimic_options, self.roi_pool_options
        # None is torchvision's "take the classes from the given box_predictor".
        if num_classes is not None:
            if isinstance(num_classes, bool) or not isinstance(num_classes, int):
                raise TypeError(
                    f"num_classes must be a positive int (or None with box_predictor), got {num_classes!r}"
                )
            if num_classes < 1:
                raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        _check_bool(self.mimic, "mimic")
        if mimic_options is not None and not isinstance(mimic_options, MimicOptions | Mapping):
            raise TypeError(
                f"mimic_options must be a MimicOptions, a dict or None, got {type(mimic_options).__name__}"
            )
        if pool_options is not None and not isinstance(pool_options, Mapping):
            raise TypeError(f"roi_pool_options must be a dict or None, got {type(pool_options).__name__}")
        check_norm_layer(self.norm_layer)

    def resnet(self, replace_stride_with_dilation=None) -> ResNet:
        return _resnet(
            self.backbone, self.dcn, self.dcn_stages, self.offset_groups, self.weights_backbone,
            self.norm_layer, replace_stride_with_dilation,
        )  # fmt: skip

    @property
    def trainable_layers(self) -> int:
        return _trainable_layers(self.trainable_backbone_layers, self.weights_backbone is not None)


def _detector_arguments(detector: type[nn.Module]) -> set[str]:
    """The keyword arguments torchvision's ``detector`` (FasterRCNN or MaskRCNN) takes by name.

    torchvision passes any other keyword on to ``GeneralizedRCNNTransform``, which ignores what it does
    not know: a misspelt argument would pass unnoticed.
    """
    names = {"_skip_resize"}  # the one keyword GeneralizedRCNNTransform reads from its **kwargs
    for init in (detector.__init__, GeneralizedRCNNTransform.__init__):
        names.update(
            name
            for name, parameter in inspect.signature(init).parameters.items()
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        )
    return names - {"self", "backbone", "num_classes"}  # the builders' own arguments


def _check_keywords(cls, kwargs: dict, extra: tuple[str, ...] = ()) -> None:
    """Reject keywords that neither torchvision's detector nor the builder (``extra``) takes."""
    detector = MaskRCNN if issubclass(cls, MaskRCNN) else FasterRCNN
    accepted = _detector_arguments(detector) | set(extra)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {unknown}: besides its own arguments the builder takes "
            f"these of torchvision's {detector.__name__}: {sorted(accepted)}"
        )


def _fpn_detector(cls, o: _DetectorOptions, kwargs: dict):
    _check_keywords(cls, kwargs)
    body = _resnet_fpn_extractor(o.resnet(), o.trainable_layers)
    model = cls(body, num_classes=o.num_classes, **kwargs)
    _install_roi_poolers(
        model, o.roi_pool, o.roi_pool_options, ["0", "1", "2", "3"], body.out_channels, kwargs
    )
    model.mimic = _mimicking(o.mimic, o.mimic_options, model)
    return model


def _install_roi_poolers(model, kind, options, names, channels, kwargs) -> None:
    """Replace RoIAlign by deformable pooling after construction (torchvision type-checks the argument)."""
    if kind == "align" and not options:
        return
    if "box_roi_pool" not in kwargs:
        model.roi_heads.box_roi_pool = roi_pooler(kind, names, 7, channels, **(options or {}))
    if isinstance(model, DCNMaskRCNN) and "mask_roi_pool" not in kwargs:
        model.roi_heads.mask_roi_pool = roi_pooler(kind, names, 14, channels, **(options or {}))


def _c4_anchors(anchors: AnchorGenerator | None) -> AnchorGenerator:
    """The C4 RPN's anchor generator: the given one, which must cover one feature map, or the paper's."""
    if anchors is None:
        return AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),))
    if not isinstance(anchors, AnchorGenerator):
        raise TypeError(f"rpn_anchor_generator must be an AnchorGenerator, got {type(anchors).__name__}")
    if len(anchors.sizes) != 1:
        raise ValueError(
            "the C4 layout's RPN sees one feature map (conv4): rpn_anchor_generator must have one tuple of "
            f"sizes, got {len(anchors.sizes)}"
        )
    return anchors


def _dilate_conv5_entry(resnet: ResNet) -> ResNet:
    """Dilate conv5's first 3x3 convolution by 2, as its others: the paper's conv5 (the a trous
    algorithm of Deformable ConvNets, "dilation of 2 for all the conv filters in conv5"), and
    mmdetection's and detectron2's dilated layouts, whose checkpoints this layout loads.
    torchvision's ``replace_stride_with_dilation`` leaves the block that used to stride at dilation 1.
    A DCN layer's offset branch (same geometry) follows it. Returns ``resnet``."""
    conv = resnet.layer4[0].conv2
    for layer in (conv, getattr(conv, "conv_offset", None)):
        if layer is not None:
            layer.dilation = (2, 2)
            layer.padding = (2, 2)
    return resnet


def _c4_detector(cls, o: _DetectorOptions, kwargs: dict):
    _check_keywords(cls, kwargs, extra=("roi_channels",))
    roi_channels = _positive_int(kwargs.pop("roi_channels", 256), "roi_channels")
    anchors = _c4_anchors(kwargs.pop("rpn_anchor_generator", None))
    backbone = o.backbone
    if isinstance(backbone, ResNet):
        if not hasattr(backbone.layer4[-1], "conv3") or backbone.layer4[0].conv2.stride != (1, 1):
            raise ValueError(
                "a ResNet instance for the C4 layout must be a bottleneck ResNet built with "
                "replace_stride_with_dilation=[False, False, True]"
            )
    elif backbone in ("resnet18", "resnet34"):
        raise ValueError(
            f"the C4 layout dilates conv5, which needs a bottleneck ResNet; got backbone={backbone!r}"
        )
    resnet = _dilate_conv5_entry(o.resnet([False, False, True]))
    trainable = o.trainable_layers
    frozen = ["layer4", "layer3", "layer2", "layer1", "conv1"][trainable:]
    if trainable < 5:
        frozen.append("bn1")
    for name, param in resnet.named_parameters():
        if any(name.startswith(prefix) for prefix in frozen):
            param.requires_grad_(False)
    conv4, conv5 = resnet.layer3[-1].conv3.out_channels, resnet.layer4[-1].conv3.out_channels
    body = C4Backbone(resnet, conv4, conv5, roi_channels)
    rpn_head = kwargs.pop("rpn_head", None)
    if rpn_head is None:
        rpn_head = RPNHead(conv4, anchors.num_anchors_per_location()[0])
    user_kwargs = dict(kwargs)
    kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign(["roi"], 7, 2))
    kwargs.setdefault("box_head", TwoMLPHead(roi_channels * 7 * 7, 1024))
    if cls is DCNMaskRCNN:
        kwargs.setdefault("mask_roi_pool", MultiScaleRoIAlign(["roi"], 14, 2))
        kwargs.setdefault("mask_head", MaskRCNNHeads(roi_channels, [256, 256, 256, 256], 1))
    rpn_settings = {
        key: kwargs.pop(f"rpn_{key}", default)
        for key, default in (
            ("pre_nms_top_n_train", 2000),
            ("pre_nms_top_n_test", 1000),
            ("post_nms_top_n_train", 2000),
            ("post_nms_top_n_test", 1000),
            ("nms_thresh", 0.7),
            ("fg_iou_thresh", 0.7),
            ("bg_iou_thresh", 0.3),
            ("batch_size_per_image", 256),
            ("positive_fraction", 0.5),
            ("score_thresh", 0.0),
        )
    }
    model = cls(body, num_classes=o.num_classes, rpn_anchor_generator=anchors, **kwargs)
    _install_roi_poolers(model, o.roi_pool, o.roi_pool_options, ["roi"], roi_channels, user_kwargs)
    model.rpn = FeatureSelectingRPN(
        "rpn",
        anchors,
        rpn_head,
        rpn_settings["fg_iou_thresh"],
        rpn_settings["bg_iou_thresh"],
        rpn_settings["batch_size_per_image"],
        rpn_settings["positive_fraction"],
        {"training": rpn_settings["pre_nms_top_n_train"], "testing": rpn_settings["pre_nms_top_n_test"]},
        {"training": rpn_settings["post_nms_top_n_train"], "testing": rpn_settings["post_nms_top_n_test"]},
        rpn_settings["nms_thresh"],
        score_thresh=rpn_settings["score_thresh"],
    )
    model.mimic = _mimicking(o.mimic, o.mimic_options, model)
    return model


# dcn -> (dcn_stages, roi_pool) of the paper's rows (Table 1 / 3): the builders' defaults.
_PAPER_ROWS: dict[DCNVersion, tuple[tuple[int, ...], RoIPoolKind]] = {
    "v2": ((3, 4, 5), "mdpool"),
    "v1": ((5,), "dpool"),
    None: ((3, 4, 5), "align"),  # no DCN layer: the stages are not used
}


def _make_detector(cls, layout: str, name: str):
    build = _fpn_detector if layout == "fpn" else _c4_detector

    def builder(
        *,
        num_classes: int = 91,
        dcn: DCNVersion = "v2",
        dcn_stages: Iterable[int] | None = None,
        offset_groups: int = 1,
        roi_pool: RoIPoolKind | None = None,
        roi_pool_options: dict | None = None,
        mimic: bool = False,
        mimic_options: MimicOptions | dict | None = None,
        backbone: str | ResNet = "resnet50",
        weights_backbone=None,
        trainable_backbone_layers: int | None = None,
        norm_layer=None,
        **kwargs,
    ):
        # An invalid dcn (even unhashable) is reported by name when the backbone is built.
        known = dcn is None or isinstance(dcn, str)
        stages_default, pool_default = _PAPER_ROWS.get(dcn, _PAPER_ROWS["v2"]) if known else _PAPER_ROWS["v2"]
        options = _DetectorOptions(
            num_classes, dcn, stages_default if dcn_stages is None else dcn_stages, offset_groups,
            pool_default if roi_pool is None else roi_pool, roi_pool_options, mimic, mimic_options,
            backbone, weights_backbone, trainable_backbone_layers, norm_layer,
        )  # fmt: skip
        return build(cls, options, kwargs)

    kind = "Mask R-CNN" if cls is DCNMaskRCNN else "Faster R-CNN"
    where = (
        "FPN on conv2-conv5"
        if layout == "fpn"
        else "the paper's C4 layout (RPN on conv4, RoI head on dilated conv5)"
    )
    c4_note = (
        ""
        if layout == "fpn"
        else "\n            ``rpn_anchor_generator`` must cover one feature map (conv4); ``roi_channels``\n"
        "            (default 256) sets the width of the reduced conv5."
    )
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"""{kind} with {where}, DCN in the backbone and deformable RoI pooling.

    Args:
        num_classes: classes including background (None: taken from a given ``box_predictor``).
        dcn: "v2", "v1" or None for the backbone's DCN layers; ``dcn_stages`` among 2-5. Left out,
            ``dcn_stages`` and ``roi_pool`` follow the paper's row of ``dcn``: DCNv2 in conv3-5 with
            "mdpool", DCNv1 in conv5 with "dpool", a regular network with "align".
        offset_groups: offset groups of the DCN layers.
        roi_pool: "mdpool" (modulated deformable RoI pooling), "dpool" (deformable) or "align"; Mask
            R-CNN replaces the 14x14 mask pooling too. ``roi_pool_options`` go to
            :class:`~deformable.nn.MultiScaleDeformRoIPool`.
        mimic: add R-CNN feature mimicking in training (``mimic_options``: :class:`MimicOptions` or dict).
        backbone: any of {sorted(BACKBONES)}, or a torchvision ``ResNet`` instance (converted in place).
        weights_backbone: ImageNet weights for the backbone (local file or torchvision enum/name).
        trainable_backbone_layers: 0-5 (default 3 with weights, 5 without), as torchvision.
        norm_layer: the backbone's normalisation (default FrozenBatchNorm2d with weights, else BatchNorm2d).
        kwargs: torchvision's {kind} arguments (min_size, max_size, rpn_*, box_*...); unknown ones
            raise TypeError.{c4_note}
    """
    return builder


fasterrcnn_resnet50_fpn_dcn = _make_detector(DCNFasterRCNN, "fpn", "fasterrcnn_resnet50_fpn_dcn")
maskrcnn_resnet50_fpn_dcn = _make_detector(DCNMaskRCNN, "fpn", "maskrcnn_resnet50_fpn_dcn")
fasterrcnn_resnet50_c4_dcn = _make_detector(DCNFasterRCNN, "c4", "fasterrcnn_resnet50_c4_dcn")
maskrcnn_resnet50_c4_dcn = _make_detector(DCNMaskRCNN, "c4", "maskrcnn_resnet50_c4_dcn")


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    check_module(model)
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "C4Backbone",
    "DCNFasterRCNN",
    "DCNMaskRCNN",
    "FeatureSelectingRPN",
    "count_parameters",
    "fasterrcnn_resnet50_c4_dcn",
    "fasterrcnn_resnet50_fpn_dcn",
    "maskrcnn_resnet50_c4_dcn",
    "maskrcnn_resnet50_fpn_dcn",
    "roi_pooler",
]
