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
    "override, key, value",
    [
        ("lr=1e-3", "lr", 1e-3),
        ("weight_decay=5e-5", "weight_decay", 5e-5),
        ("clip_grad_norm=1e1", "clip_grad_norm", 10.0),
        ("scale_jitter=[8e-1, 1.2]", "scale_jitter", [0.8, 1.2]),
        ("iterations=1e3", "iterations", 1000),
        ("eval_max_images=2.0e+1", "eval_max_images", 20),
    ],
)
def test_exponent_notation_is_a_number(override, key, value):
    # YAML 1.1 reads 1e-3 (no decimal point) as a string; int fields take integral values such as 1e3
    cfg = load_config(None, [override])
    assert getattr(cfg, key) == value
    assert type(getattr(cfg, key)) is type(value)


@pytest.mark.parametrize(
    "values, words",
    [
        ({"learning_rate": 0.1}, "unknown config keys"),
        ({"lr": "fast"}, "'lr' must be a number"),
        ({"iterations": 2.5}, "'iterations' must be an integer"),
        ({"iterations": "1.5e0"}, "'iterations' must be an integer"),
        ({"mimic": "yes"}, "'mimic' must be true or false"),
        ({"roi_pool": "max"}, "'roi_pool' must be one of"),
        ({"batch_size": 0}, "'batch_size' must be positive"),
        ({"dataset": "coco"}, "'train_images' is required"),
        ({"lr_steps": [10, 5]}, "'lr_steps' must be increasing"),
        ({"lr": float("nan")}, "'lr' must be a finite number"),
        ({"lr": float("inf")}, "'lr' must be a finite number"),
        ({"lr": "1e400"}, "'lr' must be a finite number"),
        ({"scale_jitter": [0.8, float("inf")]}, "'scale_jitter' must be a finite number"),
        ({"warmup_factor": -1}, "'warmup_factor' must be >= 0"),
        ({"lr_gamma": -1}, "'lr_gamma' must be positive"),
        ({"momentum": -1}, "'momentum' must be in \\[0, 1\\)"),
        ({"weight_decay": -1}, "'weight_decay' must be >= 0"),
        ({"workers": -1}, "'workers' must be >= 0"),
        ({"eval_every": -1}, "'eval_every' must be >= 0"),
        ({"eval_max_images": -3}, "'eval_max_images' must be null or positive"),
        ({"eval_max_images": 0}, "'eval_max_images' must be null or positive"),
        ({"clip_grad_norm": 0}, "'clip_grad_norm' must be null or positive"),
        ({"dcn_stages": [6]}, "'dcn_stages' must be distinct stages among 2, 3, 4, 5"),
        ({"dcn_stages": [3, 3]}, "'dcn_stages' must be distinct"),
        ({"offset_groups": 0}, "'offset_groups' must be positive"),
        ({"backbone": "resnet152"}, "'backbone' must be one of .*'resnet50'"),
        ({"model": "foo"}, "'model' must be one of .*'fasterrcnn_resnet50_fpn_dcn'"),
        ({"model": "param_groups"}, "'model' must be one of"),
        ({"trainable_backbone_layers": 9}, "'trainable_backbone_layers' must be one of"),
        ({"data_preset": "bogus"}, "'data_preset' must be one of .*'smoke'"),
        ({"scale_jitter": [0.8]}, "'scale_jitter' must be null or \\[low, high\\]"),
        ({"scale_jitter": [1.2, 0.8]}, "'scale_jitter' must be null or \\[low, high\\]"),
        ({"scale_jitter": [0, 1.2]}, "'scale_jitter' must be null or \\[low, high\\]"),
        ({"anchor_sizes": [32, 0]}, "'anchor_sizes' must be null or a non-empty list of positive integers"),
        ({"anchor_sizes": []}, "'anchor_sizes' must be null or a non-empty list of positive integers"),
        # the FPN has five levels (P2-P6): four sizes built a generator the RPN's head did not match
        ({"anchor_sizes": [16, 32, 64, 128]}, "'anchor_sizes' must have 5 entries for the FPN model"),
        ({"anchor_sizes": [8] * 6}, r"'anchor_sizes' must have 5 entries .* got 6: \[8, 8"),
        # pre-training trains resnet18/34/50/101 only: this failed at the start of training
        (
            {"backbone": "resnext50_32x4d", "pretrain_iterations": 10},
            r"'backbone' must be one of \('resnet18', 'resnet34', 'resnet50', 'resnet101'\) for pre-training "
            r"\(pretrain_iterations 10\), got 'resnext50_32x4d'",
        ),
        ({"box_detections_per_img": 0}, "'box_detections_per_img' must be positive"),
        (
            {"roi_pool_hidden": []},
            r"'roi_pool_hidden' must be null or a list .*\(empty only for roi_pool 'dpool'",
        ),
        ({"roi_pool_hidden": [256, 0]}, "'roi_pool_hidden' must be null or a list of positive integers"),
    ],
)
def test_bad_configs_name_the_key(values, words):
    with pytest.raises(ValueError, match=words):
        config_from_dict(values)


@pytest.mark.parametrize(
    "values, words",
    [
        ({"dcn_stages": [1]}, "'dcn_stages' must be distinct stages"),
        ({"offset_groups": 0}, "'offset_groups' must be positive"),
        ({"eval_max_images": 0}, "'eval_max_images' must be null or positive"),
        ({"momentum": 1.0}, "'momentum' must be in"),
        ({"lr": float("nan")}, "'lr' must be a finite number"),
    ],
)
def test_bad_classifier_configs_name_the_key(values, words):
    with pytest.raises(ValueError, match=words):
        config_from_dict({"task": "classification", "dataset": "deformed_fashion", **values})


def test_detector_model_key_takes_the_builders_of_deformable_models():
    from deformable import models
    from deformable.engine.config import detector_builders

    names = detector_builders()
    assert "fasterrcnn_resnet50_fpn_dcn" in names and "maskrcnn_resnet50_c4_dcn" in names
    assert all(callable(getattr(models, name)) for name in names)
    for name in names:
        assert config_from_dict({"model": name}).model == name


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


def test_bad_arguments_and_values_are_named(tmp_path):
    with pytest.raises(TypeError, match="values must be a mapping"):  # was AttributeError: 'get'
        config_from_dict(None)
    with pytest.raises(TypeError, match="kind must be TrainConfig, ClassifierConfig or None"):
        config_from_dict({}, dict)
    with pytest.raises(TypeError, match="overrides must be a list"):  # a string was split into letters
        parse_overrides("lr=0.1")
    with pytest.raises(TypeError, match="overrides must be a list"):
        parse_overrides([1])
    with pytest.raises(ValueError, match=r"--set 'lr=\[1,': the value is not valid YAML"):  # yaml.ParserError
        parse_overrides(["lr=[1,"])
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe lr: 1")
    with pytest.raises(ValueError, match=r"binary\.yaml is not UTF-8"):
        load_config(binary)
    # A config built directly is type-checked too (was TypeError: '>' not supported ... 'str' and 'int').
    with pytest.raises(ValueError, match="config key 'lr' must be a number, got 'x'"):
        TrainConfig(lr="x").validate()
    with pytest.raises(ValueError, match="config key 'batch_size' must be an integer"):
        TrainConfig(batch_size=None).validate()
    with pytest.raises(TypeError, match="config must be a TrainConfig or ClassifierConfig"):
        dump_config({"lr": 1}, tmp_path / "config.yaml")
    with pytest.raises(ValueError, match="path must be a file"):
        dump_config(TrainConfig(), tmp_path)


def test_settings_that_need_no_check_are_accepted():
    """Five sizes for an FPN, any number of sizes for C4 (one level), a ResNeXt that starts from given
    weights (pre-training is skipped) or from scratch."""
    assert config_from_dict({"anchor_sizes": [16, 32, 64, 128, 256]}).anchor_sizes == [16, 32, 64, 128, 256]
    assert config_from_dict({"model": "fasterrcnn_resnet50_c4_dcn", "anchor_sizes": [32, 64]}).anchor_sizes
    for values in ({"weights_backbone": "w.pth"}, {"pretrain_iterations": 0}):
        config_from_dict({"backbone": "resnext50_32x4d", "pretrain_iterations": 10, **values})
    # DCNv1's pooling with no hidden layer: the paper's single fc
    assert config_from_dict({"roi_pool": "dpool", "roi_pool_hidden": []}).roi_pool_hidden == []
