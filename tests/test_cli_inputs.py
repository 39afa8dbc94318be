"""Bad command-line input is a usage error (usage, a message naming the option, exit status 2)."""

from __future__ import annotations

import json

import pytest
import torch

from deformable.cli import main

CONVERT = ["convert", "--input", "in.pth", "--source", "deformable", "--out", "out.pth", "--model"]


def _usage_error(argv: list[str], capsys) -> str:
    """Run the command line, check that it stops with a usage error and return its message."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: deformable ")
    return err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
        (["bench", "--repeats", "many"], "argument --repeats: expected an integer, got 'many'"),
        (["bench", "--threads", "-1"], "argument --threads: must be >= 1, got -1"),
        (["bench", "--device", "foo"], "argument --device: expected cpu, cuda or cuda:N, got 'foo'"),
        (["bench", "--device", "meta"], "argument --device: expected cpu, cuda or cuda:N, got 'meta'"),
        (["demo", "--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
        (["demo", "--rows", "dcnv3"], "argument --rows: expected a comma-separated choice of regular"),
        (["demo", "--rows", ","], "argument --rows: expected a comma-separated choice"),
        (["demo", "--task", "classification", "--rows", "dcnv2"], "--task classification has none"),
        (["demo", "--task", "classification", "--seeds", "3"], "--task classification runs seed 0"),
        ([*CONVERT, "param_groups"], "argument --model: invalid choice: 'param_groups'"),
        ([*CONVERT, "resnet18_dcn", "--model-kwargs", "{bad"], "argument --model-kwargs: invalid JSON"),
        (
            [*CONVERT, "resnet18_dcn", "--model-kwargs", "[1]"],
            "argument --model-kwargs: expected a JSON object",
        ),
        ([*CONVERT, "resnet18_dcn", "--num-classes", "0"], "argument --num-classes: must be >= 1"),
    ],
)
def test_bad_options_are_usage_errors(argv, words, capsys):
    assert words in _usage_error(argv, capsys)


def test_bench_device_needs_cuda(capsys):
    if torch.cuda.is_available():
        argv, words = ["bench", "--device", "cuda:999"], "'cuda:999': this machine has"
    else:
        argv, words = ["bench", "--device", "cuda"], "'cuda' needs CUDA, which is not available here"
    assert words in _usage_error(argv, capsys)


def test_bench_backend_that_cannot_run_on_the_device(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton on CPU tensors only when interpreted
    err = _usage_error(["bench", "--backend", "triton", "--device", "cpu", "--small"], capsys)
    assert "backend='triton' cannot run" in err


def test_convert_reports_missing_input_and_bad_builder_arguments(tmp_path, capsys):
    out, state = tmp_path / "out.pth", tmp_path / "in.pth"
    argv = ["convert", "--source", "deformable", "--out", str(out), "--model", "resnet18_dcn", "--input"]
    err = _usage_error([*argv, str(tmp_path / "absent.pth")], capsys)
    assert "--input: checkpoint file not found" in err
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, state)
    err = _usage_error([*argv, str(state), "--model-kwargs", '{"colour": 1}'], capsys)
    assert "cannot build resnet18_dcn with {'colour': 1} (--model-kwargs, --num-classes)" in err
    assert not out.exists()


def test_eval_reports_unreadable_checkpoints(tmp_path, capsys):
    err = _usage_error(["eval", "--checkpoint", str(tmp_path / "absent.pth")], capsys)
    assert "--checkpoint" in err and "no such file" in err
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    err = _usage_error(["eval", "--checkpoint", str(garbage)], capsys)
    assert "is not a model file of deformable train/convert" in err
    truncated = tmp_path / "truncated.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    assert "is not a model file" in _usage_error(["eval", "--checkpoint", str(truncated)], capsys)


def test_eval_of_a_converted_file_asks_for_a_config(tmp_path, capsys):
    converted = tmp_path / "converted.pth"
    # what `deformable convert` writes: the state dict, its source and builder, no training config
    torch.save(
        {"model": {"fc.weight": torch.zeros(2, 512)}, "source": "torchvision", "builder": "x"}, converted
    )
    err = _usage_error(["eval", "--checkpoint", str(converted)], capsys)
    assert "holds no training config" in err and "pass --config" in err
    err = _usage_error(["eval", "--checkpoint", str(converted), "--config", "demo_smoke"], capsys)
    assert "cannot load --checkpoint" in err and "roi_heads.box_predictor" in err


def test_eval_config_errors_name_the_key(tmp_path, capsys):
    converted = tmp_path / "converted.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 512)}}, converted)
    argv = ["eval", "--checkpoint", str(converted), "--config", "demo_smoke", "--set", "lr=-1"]
    assert "config key 'lr' must be positive" in _usage_error(argv, capsys)


def test_train_config_errors_are_usage_errors(capsys):
    assert "config not found: absent_config" in _usage_error(["train", "--config", "absent_config"], capsys)
    argv = ["train", "--config", "demo_smoke", "--set", "dcn_stages=[6]"]
    assert "config key 'dcn_stages' must be distinct stages" in _usage_error(argv, capsys)


def test_train_out_is_a_folder_name_whatever_it_looks_like(monkeypatch, tmp_path):
    seen = []

    def fake_train(cfg, resume, evaluate_at_end):
        seen.append(cfg.out_dir)
        return type("Result", (), {"metrics": None})()

    monkeypatch.setattr("deformable.engine.trainer.train", fake_train)
    monkeypatch.chdir(tmp_path)
    for out in ("2024", "true", "1e3", "runs/a: b"):
        assert main(["train", "--config", "demo_smoke", "--out", out]) == 0
    assert seen == ["2024", "true", "1e3", "runs/a: b"]


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "--checkpoint", "a.pth", "--image", "i.png", "--out", "o.png", "--dpi", "0"],
        ["analyze", "--checkpoint", "a.pth", "--image", "i.png", "--out", "o.png", "--error-bound", "nan"],
        ["analyze", "--checkpoint", "a.pth", "--image", "i.png", "--out", "o.png", "--max-points", "-5"],
        ["export", "--model", "resnet50_dcn", "--out", "m.onnx", "--batch-size", "0"],
        ["export", "--model", "resnet50_dcn", "--out", "m.onnx", "--input-size", "0", "64"],
    ],
)
def test_analyze_and_export_sizes_are_checked(argv, capsys):
    assert "must be" in _usage_error(argv, capsys)


def test_info_reports_backends_and_autotuning(monkeypatch, capsys, tmp_path):
    pytest.importorskip("triton")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "automatic backend: cpu -> aten" in out
    assert "triton autotuning: off" in out
    monkeypatch.setenv("DEFORMABLE_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("DEFORMABLE_TRITON_AUTOTUNE_CACHE", str(tmp_path / "tuned.json"))
    assert main(["info"]) == 0
    assert (
        f"autotuning: on (for CUDA tensors), results kept in {tmp_path / 'tuned.json'}"
        in capsys.readouterr().out
    )


def _detector_file(tmp_path, categories: list | None) -> tuple:
    """A detector's model file (untrained) whose config names a training folder that does not exist and a
    validation file without the training set's 'cat'; with ``categories`` (the training set's, as
    `deformable train` stores them)."""
    import copy

    from deformable.engine.config import load_config
    from deformable.engine.trainer import build_model

    from .data.helpers import coco_dict, write_dataset

    data = copy.deepcopy(coco_dict())
    data["categories"] = [c for c in data["categories"] if c["id"] != 3]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 3]
    val_images, val_json = write_dataset(tmp_path / "val", data)
    absent = tmp_path / "absent"
    cfg = load_config(
        "demo_smoke",
        [
            "dataset=coco", f"train_images={absent}", f"train_annotations={absent / 'train.json'}",
            f"val_images={val_images}", f"val_annotations={val_json}", "pretrain_iterations=0", "min_size=32",
            "max_size=48", "device=cpu", "batch_size=1",
        ],
    )  # fmt: skip
    model = build_model(cfg, 4)  # three training categories and the background
    path = tmp_path / "model_final.pth"
    saved = {"model": model.state_dict(), "config": cfg.to_dict()}
    torch.save(saved if categories is None else {**saved, "categories": categories}, path)
    return path, val_json


def test_eval_needs_only_the_validation_set(tmp_path, capsys):
    """`deformable eval` built the training set too, so it failed where the training folder is gone."""
    categories = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]
    path, _ = _detector_file(tmp_path, categories)
    assert main(["eval", "--checkpoint", str(path)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 2 and "AP" in metrics["bbox"]


def test_eval_refuses_labels_it_cannot_match_to_the_validation_categories(tmp_path, capsys):
    path, val_json = _detector_file(tmp_path, None)  # no stored categories, no training annotations
    err = _usage_error(["eval", "--checkpoint", str(path)], capsys)
    assert "scores 4 classes (with background) but the validation set has 3" in err
    path, val_json = _detector_file(tmp_path, [{"id": 7, "name": "dog"}, {"id": 12, "name": "fox"}])
    err = _usage_error(["eval", "--checkpoint", str(path)], capsys)
    assert "cannot build the validation set" in err and f"{val_json} has categories [11]" in err


def test_classifier_eval_needs_only_the_validation_folder(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from deformable.engine.classifier import build_classifier
    from deformable.engine.config import ClassifierConfig

    for name in ("cat", "dog"):
        (tmp_path / "val" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "val" / name / "0.png")
    cfg = ClassifierConfig(
        train_dir=str(tmp_path / "absent"), val_dir=str(tmp_path / "val"), arch="resnet18", stem="small",
        dcn=None, image_size=32, resize_size=32, batch_size=2, workers=0, device="cpu",
    )  # fmt: skip
    torch.save({"model": build_classifier(cfg, 2).state_dict(), "config": cfg.to_dict()}, tmp_path / "m.pth")
    assert main(["eval", "--checkpoint", str(tmp_path / "m.pth")]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    torch.save({"model": build_classifier(cfg, 3).state_dict(), "config": cfg.to_dict()}, tmp_path / "m.pth")
    err = _usage_error(["eval", "--checkpoint", str(tmp_path / "m.pth")], capsys)
    assert "scores 3 classes but the validation set has 2" in err
