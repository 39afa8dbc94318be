"""Fixtures of the analysis tests: one small detector built by the library, shared by the module tests."""

from __future__ import annotations

import pytest
import torch

from deformable.models import fasterrcnn_resnet50_fpn_dcn


@pytest.fixture(scope="session")
def detector():
    """A Faster R-CNN with a ResNet-18 FPN backbone, DCNv2 in conv5 and modulated deformable RoI pooling
    (eval mode, 64-96 pixel images)."""
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn_dcn(
        num_classes=3, backbone="resnet18", dcn_stages=(5,), min_size=64, max_size=96
    )
    return model.eval()
