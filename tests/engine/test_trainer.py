"""Training: loss goes down, resumption is exact, killed runs lose at most one checkpoint interval,
distributed training runs, the demo runs end to end, and bad set-ups fail before training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deformable.engine.config import load_config
from deformable.engine.metrics_log import read_records
from deformable.engine.trainer import (
    CHECKPOINT_NAME,
    FINAL_NAME,
    IterationBatchSampler,
    build_datasets,
    build_model,
    train,
)


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_records(run_dir / "metrics.jsonl") if "loss" in r}


def _logged_iterations(run_dir: Path) -> list[int]:
    """The iterations of the training records in file order (each should appear once)."""
    return [r["iteration"] for r in read_records(run_dir / "metrics.jsonl") if "loss" in r]


def test_sampler_is_deterministic_resumable_and_sharded():
    full = list(IterationBatchSampler(10, 2, seed=3, start=0, stop=12))
    tail = list(IterationBatchSampler(10, 2, seed=3, start=7, stop=12))
    assert full[7:] == tail
    epoch0 = [i for batch in full[:5] for _, i in batch]
    assert sorted(epoch0) == list(range(10)) and full[5][0][0] == 1
    ranks = [list(IterationBatchSampler(10, 2, seed=3, start=0, stop=2, rank=r, world=2)) for r in (0, 1)]
    assert not {i for b in ranks[0] for _, i in b} & {i for b in ranks[1] for _, i in b}
    with pytest.raises(ValueError, match="smaller than one batch"):
        IterationBatchSampler(3, 4, seed=0, start=0, stop=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [  # batch_size 0 and world 0 were ZeroDivisionErrors; 2.0 a RuntimeError from manual_seed
        ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ({"batch_size": 2.0}, "batch_size must be an int >= 1"),
        ({"world": 0}, "world must be an int >= 1"),
        ({"rank": 2, "world": 2}, r"rank must be < world \(2\)"),  # silently an empty shard
        ({"size": -1}, "size must be an int >= 0"),
    ],
)
def test_sampler_arguments_are_checked(kwargs, message):
    args = {"size": 10, "batch_size": 2, "seed": 0, "start": 0, "stop": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        IterationBatchSampler(**args)


def test_eval_indices_takes_none_or_a_positive_count():
    from deformable.engine.loop import eval_indices

    assert eval_indices(5, None) == [0, 1, 2, 3, 4] and eval_indices(5, 2) == [0, 1]
    # Spread (classification: ImageFolder lists its images by class): 4 of 8 images of 2 classes
    # took class 0's four.
    assert eval_indices(8, 4, spread=True) == [0, 2, 4, 6]
    assert eval_indices(8, 20, spread=True) == list(range(8))
    assert eval_indices(1000, 7, spread=True) == [0, 142, 285, 428, 571, 714, 857]
    for bad in (-1, 0, 1.5):  # -1 silently dropped the last image; 1.5 was a slice TypeError
        with pytest.raises(ValueError, match="max_images must be None"):
            eval_indices(5, bad)


@pytest.mark.slow
def test_short_training_reduces_the_loss_on_a_fixed_batch(smoke_overrides):
    from deformable.data import collate_detection

    cfg = load_config("demo_smoke", [*smoke_overrides, "iterations=15", "lr=0.01", "checkpoint_every=15"])
    train_set, _ = build_datasets(cfg)
    batches = [
        collate_detection([train_set[i] for i in range(start, start + 4)]) for start in range(0, 16, 4)
    ]

    def fixed_batch_loss(model):
        """Mean loss over 16 fixed training images, with the same anchor/RoI sampling each time."""
        model.train()
        torch.manual_seed(0)
        with torch.no_grad():
            return sum(sum(model(images, targets).values()).item() for images, targets in batches) / len(
                batches
            )

    torch.manual_seed(cfg.seed)
    initial = fixed_batch_loss(build_model(cfg, train_set.num_classes + 1))
    result = train(cfg, evaluate_at_end=False)
    trained = build_model(cfg, train_set.num_classes + 1)
    trained.load_state_dict(torch.load(result.out_dir / FINAL_NAME, weights_only=True)["model"])
    final = fixed_batch_loss(trained)
    print(f"fixed-batch loss {initial:.3f} -> {final:.3f}")
    assert final < initial


@pytest.mark.slow
def test_resume_reproduces_the_next_iteration(smoke_overrides, tmp_path):
    base = [o for o in smoke_overrides if not o.startswith("out_dir")]
    straight = load_config(
        "demo_smoke", [*base, f"out_dir={tmp_path / 'a'}", "iterations=4", "checkpoint_every=2"]
    )
    train(straight, evaluate_at_end=False)
    first = load_config(
        "demo_smoke", [*base, f"out_dir={tmp_path / 'b'}", "iterations=2", "checkpoint_every=2"]
    )
    first_result = train(first, evaluate_at_end=False)
    second = load_config(
        "demo_smoke", [*base, f"out_dir={tmp_path / 'b'}", "iterations=4", "checkpoint_every=2"]
    )
    second_result = train(second, resume=True, evaluate_at_end=False)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert _logged_iterations(tmp_path / "b") == [1, 2, 3, 4]
    for iteration in (3, 4):
        assert b[iteration] == pytest.approx(a[iteration], rel=1e-6, abs=1e-7)
    # The resumed run reports the training time of all 4 iterations (the demo's ms/iter), and
    # resuming a finished run trains nothing and still reports it.
    assert second_result.iterations == 4
    assert second_result.train_seconds > first_result.train_seconds > 0
    saved = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)["train_seconds"]
    assert first_result.train_seconds < saved <= second_result.train_seconds
    again = train(second, resume=True, evaluate_at_end=False)
    assert again.iterations == 4
    assert saved <= again.train_seconds < saved + 1.0
    assert _logged_iterations(tmp_path / "b") == [1, 2, 3, 4]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "deformable", *args]


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(smoke_overrides, tmp_path):
    run = tmp_path / "killed"
    sets = [o for o in smoke_overrides if not o.startswith("out_dir")]
    command = _cli("train", "--config", "demo_smoke", "--out", str(run), "--no-eval")
    for item in [*sets, "iterations=40", "checkpoint_every=2"]:
        command += ["--set", item]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    checkpoint = run / CHECKPOINT_NAME
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), process.stderr.read().decode() if process.poll() is not None else "timeout"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    saved = torch.load(checkpoint, weights_only=True)["iteration"]
    logged = max(_losses(run))
    assert saved >= 2 and logged - saved < 2  # at most the work since the last checkpoint is lost
    assert not list(run.glob(".*.tmp"))  # no half-written checkpoint left under the real name
    resumed = load_config("demo_smoke", [*sets, f"out_dir={run}", "iterations=" + str(saved + 2)])
    result = train(resumed, resume=True, evaluate_at_end=False)
    assert result.iterations == saved + 2
    # What the killed run logged after its checkpoint is dropped, not logged twice.
    assert _logged_iterations(run) == list(range(1, saved + 3))


@pytest.mark.slow
def test_two_process_torchrun_on_cpu(smoke_overrides, tmp_path):
    run = tmp_path / "ddp"
    sets = [o for o in smoke_overrides if not o.startswith("out_dir")]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
    ]
    command += ["-m", "deformable", "train", "--config", "demo_smoke", "--out", str(run), "--no-eval"]
    for item in [*sets, "iterations=2", "checkpoint_every=2", "batch_size=1"]:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-10000:]
    state = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    assert state["iteration"] == 2 and len(state["rng"]) == 2


@pytest.mark.slow
def test_demo_smoke_end_to_end(data_dir, tmp_path):
    from deformable.engine.demo import ROWS, run_demo

    out = run_demo("smoke", tmp_path / "demo", [f"data_dir={data_dir}", "progress=false", "iterations=3"])
    table = (out / "report.md").read_text()
    for name, _ in ROWS:
        assert name in table
    assert (out / "results.csv").read_text().count("\n") == len(ROWS) + 1
    for png in ("training_curves.png", "example_detections.png"):
        assert (out / png).stat().st_size > 10_000


def test_unwritable_output_folder_fails_before_training(smoke_overrides, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = load_config("demo_smoke", [*smoke_overrides, f"out_dir={blocker / 'run'}"])
    with pytest.raises(ValueError, match="not writable"):
        train(cfg)


def test_class_count_mismatch_fails_before_training(smoke_overrides):
    cfg = load_config("demo_smoke", [*smoke_overrides, "num_classes=5"])
    with pytest.raises(ValueError, match="num_classes"):
        train(cfg)


def test_invalid_annotation_file_fails_before_training(tmp_path):
    bad = tmp_path / "instances.json"
    bad.write_text("{not json")
    cfg = load_config(
        "demo_smoke",
        [
            "dataset=coco", f"train_images={tmp_path}", f"train_annotations={bad}", f"val_images={tmp_path}",
            f"val_annotations={bad}", f"out_dir={tmp_path / 'run'}",
        ],
    )  # fmt: skip
    with pytest.raises(ValueError):
        train(cfg)


@pytest.mark.slow
def test_classification_demo_smoke(tmp_path, monkeypatch):
    from deformable.engine.classification import run_classification_demo

    monkeypatch.setenv("DEFORMABLE_CACHE", str(tmp_path / "cache"))
    results = run_classification_demo(
        "smoke", tmp_path / "out", ["iterations=2", "num_train=64", "num_val=32", "batch_size=16"]
    )
    assert [r.name for r in results] == ["regular", "DCNv1 (conv3-5)", "DCNv2 (conv3-5)"]
    assert all(0.0 <= r.top1_error <= 1.0 for r in results)
    assert results[2].parameters > results[0].parameters
    assert "top-1 error" in (tmp_path / "out" / "classification.md").read_text()
