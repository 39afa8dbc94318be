"""Backbone pre-training on the embedded data (the demo's stand-in for ImageNet weights)."""

from __future__ import annotations

import json

import pytest
import torch

from deformable.engine.config import load_config
from deformable.engine.pretrain import norm_layer_for, pretrained_backbone
from deformable.models import resnet18_dcn


def test_pretrained_backbone_is_cached_and_loads_into_a_dcn_resnet(tmp_path):
    path = pretrained_backbone("resnet18", "gn", 2, cache_dir=tmp_path, progress=False)
    report = json.loads(path.with_suffix(".json").read_text())
    assert 0.0 <= report["top1_accuracy"] <= 1.0 and report["iterations"] == 2
    stamp = path.stat().st_mtime_ns
    assert pretrained_backbone("resnet18", "gn", 2, cache_dir=tmp_path) == path
    assert path.stat().st_mtime_ns == stamp  # the second call trained nothing
    assert not list(path.parent.glob("*.tmp*"))

    state = torch.load(path, weights_only=True)
    model = resnet18_dcn(dcn="v2", dcn_stages=(3, 4, 5), weights=path, norm_layer=norm_layer_for("gn"))
    # The deformable layers start from the pre-trained convolutions (their offsets from zero).
    torch.testing.assert_close(model.layer4[0].conv2.weight, state["layer4.0.conv2.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"], rtol=0, atol=0)
    # A different recipe is a different file.
    assert pretrained_backbone("resnet18", "gn", 3, cache_dir=tmp_path, progress=False) != path


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(arch="resnet18", norm="gn", iterations=0), ["iterations", "positive", "0"]),
        (dict(arch="vgg16", norm="gn", iterations=2), ["resnet18", "vgg16"]),
        (dict(arch="resnet18", norm="frozen_bn", iterations=2), ["norm", "frozen_bn"]),
    ],
)
def test_bad_pretraining_arguments(tmp_path, kwargs, words):
    with pytest.raises(ValueError) as info:
        pretrained_backbone(**kwargs, cache_dir=tmp_path, progress=False)
    for word in words:
        assert word in str(info.value)


def test_config_rejects_negative_pretraining():
    with pytest.raises(ValueError, match="pretrain_iterations"):
        load_config("demo_smoke", ["pretrain_iterations=-1"]).validate()
