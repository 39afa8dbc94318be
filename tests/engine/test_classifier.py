"""The classification trainer (``task: classification`` configs): ImageFolder data, training, exact
resume, evaluation, the CLI, and clear errors for bad data."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deformable.cli import main as cli_main
from deformable.data.image_folder import image_folder_datasets
from deformable.engine.classifier import learning_rate_factor, load_trained_classifier, train_classifier
from deformable.engine.config import ClassifierConfig, load_any_config
from deformable.engine.trainer import CHECKPOINT_NAME, FINAL_NAME

CLASSES = ("cat", "dog", "fox")


def _image_folder(root: Path, per_class: int, seed: int) -> Path:
    """One folder per class of random RGB images of varying size (the class shifts the mean colour)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(36, 60, size=2)
            pixels = rng.integers(0, 120, size=(h, w, 3)) + 60 * label
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    return _image_folder(root / "train", 6, 0), _image_folder(root / "val", 2, 1)


def _overrides(folders, out: Path, *extra: str) -> list[str]:
    train_dir, val_dir = folders
    return [
        f"train_dir={train_dir}", f"val_dir={val_dir}", f"out_dir={out}", "arch=resnet18", "image_size=32",
        "resize_size=36", "batch_size=4", "workers=0", "progress=false", "log_every=1", "amp=none",
        "checkpoint_every=2", "lr=0.01", "lr_steps=[]", "device=cpu", *extra,
    ]  # fmt: skip


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in records if "loss" in r}


def test_image_folder_datasets_share_classes_and_shape_images(folders):
    train, val = image_folder_datasets(*folders, image_size=32, resize_size=36)
    assert train.classes == val.classes == list(CLASSES)
    assert len(train) == 18 and len(val) == 6
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0


def test_bad_image_sizes_are_named_before_reading_images(folders):
    from deformable.data.image_folder import classification_transforms

    # were RuntimeErrors from torch's interpolate on the first image (1.5 gave 1x1 images)
    for size in (0, -1, 1.5, None):
        with pytest.raises(ValueError, match="image_size must be a positive int"):
            image_folder_datasets(*folders, image_size=size)
    with pytest.raises(ValueError, match="resize_size must be a positive int"):
        classification_transforms(False, 32, 0)


def test_trains_evaluates_and_reloads(folders, tmp_path):
    warmup = ("warmup_iterations=3", "warmup_factor=0.25")
    overrides = _overrides(folders, tmp_path / "run", "iterations=3", *warmup)
    cfg = load_any_config("imagenet_resnet50_dcnv2", overrides)
    assert isinstance(cfg, ClassifierConfig) and cfg.dcn == "v2"
    result = train_classifier(cfg)
    # Each iteration logs the rate its step used (was the next step's: iteration 1 showed step 2's).
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["iteration"]: r["lr"] for r in records if "lr" in r}
    assert logged == {i: pytest.approx(0.01 * learning_rate_factor(cfg, i - 1)) for i in (1, 2, 3)}
    assert logged[1] == pytest.approx(0.0025)
    assert result.iterations == 3 and math.isfinite(result.final_loss)
    assert result.metrics["images"] == 6
    assert 0.0 <= result.top5_error <= result.top1_error <= 1.0
    assert result.train_seconds > 0
    model = load_trained_classifier(tmp_path / "run" / FINAL_NAME)
    assert sum(p.numel() for p in model.parameters()) == result.parameters
    assert (tmp_path / "run" / "eval.json").exists() and (tmp_path / "run" / "config.yaml").exists()


def test_resume_reproduces_the_next_iterations(folders, tmp_path):
    straight = load_any_config("imagenet_resnet50_dcnv2", _overrides(folders, tmp_path / "a", "iterations=4"))
    train_classifier(straight, evaluate_at_end=False)
    first = load_any_config("imagenet_resnet50_dcnv2", _overrides(folders, tmp_path / "b", "iterations=2"))
    train_classifier(first, evaluate_at_end=False)
    second = load_any_config("imagenet_resnet50_dcnv2", _overrides(folders, tmp_path / "b", "iterations=4"))
    result = train_classifier(second, resume=True, evaluate_at_end=False)
    assert result.iterations == 4
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4]
    for iteration in (3, 4):
        assert b[iteration] == pytest.approx(a[iteration], rel=1e-6, abs=1e-7)
    state = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)
    assert state["iteration"] == 4


def test_cli_train_and_eval_read_the_task(folders, tmp_path, capsys):
    run = tmp_path / "cli"
    argv = ["train", "--config", "imagenet_resnet50_dcnv2", "--out", str(run)]
    for item in _overrides(folders, run, "iterations=2", "dcn=null"):
        argv += ["--set", item]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :])["images"] == 6
    assert cli_main(["eval", "--checkpoint", str(run / FINAL_NAME)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 6 and 0.0 <= metrics["top1_error"] <= 1.0


def test_short_training_reduces_the_loss_on_deformed_fashion(tmp_path):
    overrides = [
        "dataset=deformed_fashion", "num_train=64", "num_val=20", f"data_dir={tmp_path / 'cache'}",
        f"out_dir={tmp_path / 'run'}", "arch=resnet18", "dcn=v1", "image_size=32", "resize_size=32",
        "batch_size=16", "iterations=30", "lr=0.05", "lr_schedule=cosine", "warmup_iterations=3",
        "workers=0", "progress=false", "log_every=1", "checkpoint_every=30", "device=cpu",
    ]  # fmt: skip
    cfg = load_any_config("imagenet_resnet50_dcnv2", overrides)
    result = train_classifier(cfg)
    losses = _losses(tmp_path / "run")
    first = sum(losses[i] for i in range(1, 6)) / 5
    last = sum(losses[i] for i in range(26, 31)) / 5
    assert last < first
    assert result.metrics["images"] == 20


def test_cosine_schedule():
    cfg = ClassifierConfig(train_dir="x", val_dir="y", iterations=100, lr_schedule="cosine")
    cfg.warmup_iterations, cfg.warmup_factor = 10, 0.1
    factors = [learning_rate_factor(cfg, i) for i in range(101)]
    assert factors[0] == pytest.approx(0.1)
    assert max(factors) <= 1.0 and factors[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing", "train_dir .* is not a folder"),
        ("empty", "train_dir"),
        ("mismatch", "same class folders"),
        ("no_dirs", "train_dir' is required"),
        ("bad_arch", "arch"),
        ("resize", "resize_size"),
    ],
)
def test_bad_input_fails_before_training(folders, tmp_path, problem, message):
    overrides = _overrides(folders, tmp_path / "run", "iterations=2")
    if problem == "missing":
        overrides.append(f"train_dir={tmp_path / 'nowhere'}")
    elif problem == "empty":
        (tmp_path / "empty" / "cat").mkdir(parents=True)
        overrides.append(f"train_dir={tmp_path / 'empty'}")
    elif problem == "mismatch":
        other = _image_folder(tmp_path / "other", 1, 2)
        (other / "fox").rename(other / "wolf")
        overrides.append(f"val_dir={other}")
    elif problem == "no_dirs":
        overrides.append("train_dir=null")
    elif problem == "bad_arch":
        overrides.append("arch=vgg16")
    else:
        overrides.append("resize_size=16")
    with pytest.raises(ValueError, match=message):
        train_classifier(load_any_config("imagenet_resnet50_dcnv2", overrides))
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()
