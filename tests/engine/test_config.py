"""Flat YAML configs and overrides."""

from __future__ import annotations

import pytest

from deformable.engine.config import (
    CONFIG_DIR,
    ClassifierConfig,
    TrainConfig,
    config_from_dict,
    dump_config,
    load_any_config,
    load_config,
    parse_overrides,
)
from deformable.engine.trainer import lr_factor


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    classification = "task: classification" in path.read_text()
    # An ImageFolder config names no data folders: the user's ImageNet path is given with --set.
    overrides = ["train_dir=/data/train", "val_dir=/data/val"] if classification else []
    cfg = load_any_config(path, overrides)
    assert isinstance(cfg, ClassifierConfig if classification else TrainConfig)
    assert cfg.iterations > 0


def test_the_task_key_picks_the_config_kind():
    assert isinstance(
        config_from_dict({"task": "classification", "dataset": "deformed_fashion"}), ClassifierConfig
    )
    assert isinstance(config_from_dict({"task": "detection"}), TrainConfig)
    with pytest.raises(ValueError, match="classification config"):
        load_config("imagenet_resnet50_dcnv2", ["train_dir=a", "val_dir=b"])
    with pytest.raises(ValueError, match="unknown config keys \\['roi_pool'\\]"):
        config_from_dict({"task": "classification", "dataset": "deformed_fashion", "roi_pool": "mdpool"})
    with pytest.raises(ValueError, match="'task' must be one of"):
        config_from_dict({"task": "segmentation", "dataset": "deformed_fashion"}, ClassifierConfig)


def test_overrides_are_yaml_values():
    cfg = load_config(
        "demo_smoke", ["lr=0.5", "dcn_stages=[5]", "dcn=null", "mimic=true", "clip_grad_norm=2"]
    )
    assert cfg.lr == 0.5 and cfg.dcn_stages == [5] and cfg.dcn is None and cfg.mimic is True
    assert cfg.clip_grad_norm == 2.0
    assert parse_overrides(["a=1", "b="]) == {"a": 1, "b": None}


@pytest.mark.parametrize(
    "values, words",
    [
        ({"learning_rate": 0.1}, "unknown config keys"),
        ({"lr": "fast"}, "'lr' must be a number"),
        ({"iterations": 2.5}, "'iterations' must be an integer"),
        ({"mimic": "yes"}, "'mimic' must be true or false"),
        ({"roi_pool": "max"}, "'roi_pool' must be one of"),
        ({"batch_size": 0}, "'batch_size' must be positive"),
        ({"dataset": "coco"}, "'train_images' is required"),
        ({"lr_steps": [10, 5]}, "'lr_steps' must be increasing"),
    ],
)
def test_bad_configs_name_the_key(values, words):
    with pytest.raises(ValueError, match=words):
        config_from_dict(values)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["lr"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [1, 2\n")
    with pytest.raises(ValueError, match="YAML"):
        load_config(broken)


def test_dump_round_trip(tmp_path):
    cfg = load_config("demo_default", ["seed=3"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_warmup_and_step_schedule():
    cfg = config_from_dict(
        {"warmup_iterations": 10, "warmup_factor": 0.1, "lr_steps": [20, 30], "lr_gamma": 0.1}
    )
    assert lr_factor(cfg, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 5) == pytest.approx(0.55)
    assert lr_factor(cfg, 10) == 1.0 and lr_factor(cfg, 19) == 1.0
    assert lr_factor(cfg, 20) == pytest.approx(0.1) and lr_factor(cfg, 30) == pytest.approx(0.01)
