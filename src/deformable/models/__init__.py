"""DCN backbones and detectors built on torchvision, parameter groups and checkpoint import."""

from .backbones import (
    BACKBONES,
    convert_resnet_to_dcn,
    count_dcn_layers,
    freeze_offsets_to_identity,
    move_stride_to_1x1,
    resnet18_dcn,
    resnet34_dcn,
    resnet50_dcn,
    resnet101_dcn,
    resnext50_32x4d_dcn,
    resnext101_32x8d_dcn,
)
from .checkpoint import LoadReport, load_checkpoint, read_state_dict
from .detection import (
    C4Backbone,
    DCNFasterRCNN,
    DCNMaskRCNN,
    count_parameters,
    fasterrcnn_resnet50_c4_dcn,
    fasterrcnn_resnet50_fpn_dcn,
    maskrcnn_resnet50_c4_dcn,
    maskrcnn_resnet50_fpn_dcn,
    roi_pooler,
)
from .mimic import FeatureMimicking, MimicOptions
from .param_groups import param_groups

__all__ = [
    "BACKBONES",
    "C4Backbone",
    "DCNFasterRCNN",
    "DCNMaskRCNN",
    "FeatureMimicking",
    "LoadReport",
    "MimicOptions",
    "convert_resnet_to_dcn",
    "count_dcn_layers",
    "count_parameters",
    "fasterrcnn_resnet50_c4_dcn",
    "fasterrcnn_resnet50_fpn_dcn",
    "freeze_offsets_to_identity",
    "load_checkpoint",
    "maskrcnn_resnet50_c4_dcn",
    "maskrcnn_resnet50_fpn_dcn",
    "move_stride_to_1x1",
    "param_groups",
    "read_state_dict",
    "resnet18_dcn",
    "resnet34_dcn",
    "resnet50_dcn",
    "resnet101_dcn",
    "resnext50_32x4d_dcn",
    "resnext101_32x8d_dcn",
    "roi_pooler",
]
