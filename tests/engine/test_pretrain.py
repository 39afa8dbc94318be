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


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_pretraining_runs_on_the_given_device(tmp_path, monkeypatch, device):
    """Pre-training always ran on the CPU, whatever device the detector trained on."""
    import torchvision

    from deformable.engine import pretrain

    seen = set()
    original = torchvision.models.resnet18

    def spied(**kwargs):
        model = original(**kwargs)
        model.register_forward_pre_hook(
            lambda module, args: seen.add((args[0].device.type, next(module.parameters()).device.type))
        )
        return model

    monkeypatch.setattr(torchvision.models, "resnet18", spied)
    monkeypatch.setattr(pretrain, "BATCH_SIZE", 8)  # quicker
    path = pretrained_backbone("resnet18", "gn", 2, cache_dir=tmp_path, progress=False, device=device)
    assert seen == {(device, device)}
    assert {t.device.type for t in torch.load(path, weights_only=True).values()} == {"cpu"}  # loads anywhere


def test_detector_training_pretrains_on_its_own_device(smoke_overrides, monkeypatch):
    import deformable.engine.trainer as trainer

    calls = []

    class Stop(Exception):
        pass

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setattr(trainer, "pretrained_backbone", recorded)
    cfg = load_config("demo_smoke", [*smoke_overrides, "device=cpu"])
    with pytest.raises(Stop):
        trainer.train(cfg)
    assert calls[0]["device"] == torch.device("cpu")
