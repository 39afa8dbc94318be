"""Data parallelism: each process on its own GPU, resuming under the same number of processes, evaluating
the model rank 0 saves, and evaluation counts and timings over all processes. The multi-process tests
run two CPU processes with gloo."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from deformable.engine import loop
from deformable.engine.config import ClassifierConfig, load_config
from deformable.engine.loop import CHECKPOINT_NAME, TrainingRun, ddp_device_ids, device_for, local_rank

from ..data.helpers import write_dataset

needs_fork = pytest.mark.skipif(
    "fork" not in mp.get_all_start_methods(), reason="needs the fork start method"
)


@pytest.fixture
def two_gpus(monkeypatch):
    """A node with two (pretended) CUDA devices; returns the devices made current."""
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    return current


@pytest.mark.parametrize("setting", ["cuda", "auto"])
def test_each_torchrun_process_takes_its_local_gpu(two_gpus, monkeypatch, setting):
    """Every process was put on cuda:0 (LOCAL_RANK never read, DDP given device_ids=[None])."""
    monkeypatch.setenv("WORLD_SIZE", "4")  # two nodes of two
    monkeypatch.setenv("LOCAL_RANK", "1")
    device = device_for(SimpleNamespace(device=setting))
    assert device == torch.device("cuda", 1)
    assert two_gpus == [device]  # made current, so NCCL and index-less CUDA calls use it
    assert ddp_device_ids(device) == [1]


def test_one_process_and_the_cpu_take_the_plain_device(two_gpus, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert device_for(SimpleNamespace(device="cuda")) == torch.device("cuda") and not two_gpus
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device_for(SimpleNamespace(device="cpu")) == torch.device("cpu") and not two_gpus
    assert ddp_device_ids(torch.device("cpu")) is None


def test_local_rank_must_name_a_gpu_of_the_node(two_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK is 2 but this node has 2 CUDA device\(s\)"):
        device_for(SimpleNamespace(device="cuda"))
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(ValueError, match="LOCAL_RANK must be an int >= 0 when WORLD_SIZE > 1"):
        device_for(SimpleNamespace(device="cuda"))
    monkeypatch.setenv("LOCAL_RANK", "-1")
    with pytest.raises(ValueError, match="LOCAL_RANK must be an int >= 0"):
        local_rank(2)
    assert not two_gpus


# ------------------------------------------------------------------------------------------------
# Resuming


def _classifier_config(out_dir: Path, **changes) -> ClassifierConfig:
    values = dict(
        dataset="deformed_fashion", out_dir=str(out_dir), iterations=1, checkpoint_every=1, log_every=1,
        lr=0.1, lr_steps=[], progress=False, tensorboard=False, workers=0,
    )  # fmt: skip
    return ClassifierConfig(**{**values, **changes})


def _tiny_model() -> nn.Module:
    """[N, 1, 4, 4] -> [N, 2], with BatchNorm running statistics (buffers) to keep in step."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(32, 2))


def _one_step(run: TrainingRun, inputs: torch.Tensor) -> None:
    loss = run.train_model(inputs).square().mean()
    run.step(loss, {"loss": float(loss.detach())})


def test_resuming_under_another_number_of_processes_is_refused(tmp_path):
    cfg = _classifier_config(tmp_path / "run")
    run = TrainingRun(cfg, _tiny_model(), torch.device("cpu"), lambda it: 1.0, 0, 1, resume=False)
    _one_step(run, torch.randn(4, 1, 4, 4))
    run.finish(None)
    path = tmp_path / "run" / CHECKPOINT_NAME
    assert torch.load(path, weights_only=True)["world_size"] == 1
    more = _classifier_config(tmp_path / "run", iterations=2)
    with pytest.raises(ValueError) as info:
        TrainingRun(more, _tiny_model(), torch.device("cpu"), lambda it: 1.0, 0, 2, resume=True)
    message = str(info.value)
    assert (
        "saved by a run of 1 processes, now 2" in message and "sharding" in message and str(path) in message
    )
    # A checkpoint from before the count was saved is accepted by as many processes; a single process
    # saved its random state as a dict, so it is refused under two.
    state = torch.load(path, weights_only=True)
    del state["world_size"]
    torch.save(state, path)
    assert isinstance(state["rng"], dict)
    with pytest.raises(ValueError, match="saved by a run of 1 processes, now 2"):
        TrainingRun(more, _tiny_model(), torch.device("cpu"), lambda it: 1.0, 0, 2, resume=True)
    assert TrainingRun(more, _tiny_model(), torch.device("cpu"), lambda it: 1.0, 0, 1, resume=True).start == 1


def test_run_metadata_goes_into_both_model_files_and_cannot_hide_their_keys(tmp_path):
    cfg = _classifier_config(tmp_path / "run")
    metadata = {"categories": [{"id": 3, "name": "cat"}]}
    run = TrainingRun(cfg, _tiny_model(), torch.device("cpu"), lambda it: 1.0, 0, 1, False, metadata)
    _one_step(run, torch.randn(4, 1, 4, 4))
    run.finish(None)
    for name in (CHECKPOINT_NAME, loop.FINAL_NAME):
        assert torch.load(tmp_path / "run" / name, weights_only=True)["categories"] == metadata["categories"]
    with pytest.raises(ValueError, match=r"metadata must not use the model files' own keys, got \['model'\]"):
        TrainingRun(cfg, _tiny_model(), torch.device("cpu"), lambda it: 1.0, 0, 1, False, {"model": {}})


# ------------------------------------------------------------------------------------------------
# Two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(port: int, rank: int, world: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _buffers_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    _join(port, rank, world)
    try:
        cfg = _classifier_config(Path(out_dir) / "run")
        model = _tiny_model()
        run = TrainingRun(cfg, model, torch.device("cpu"), lambda it: 1.0, rank, world, resume=False)
        # Each process normalises its own batch: the running statistics drift apart.
        inputs = (
            torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(rank)) * (1 + rank) + 5 * rank
        )
        _one_step(run, inputs)
        seen = {}

        def evaluate() -> dict:
            seen["mean"] = model[1].running_mean.tolist()
            return {"mean": seen["mean"]}

        run.finish(evaluate)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


@needs_fork
def test_every_process_evaluates_the_model_rank_0_saves(tmp_path):
    """Each rank evaluated with its own BatchNorm running statistics, not the saved model's."""
    mp.start_processes(
        _buffers_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    means = [json.loads((tmp_path / f"rank{r}.json").read_text())["mean"] for r in range(2)]
    saved = torch.load(tmp_path / "run" / loop.FINAL_NAME, weights_only=True)["model"]["1.running_mean"]
    assert means[0] == means[1] == saved.tolist()


class _SlowOnRank1(nn.Module):
    """A detector stand-in: one box per image; on rank 1 it takes 0.1 s per image, on rank 0 none."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.delay = 0.1 if rank == 1 else 0.0

    def forward(self, images):
        time.sleep(self.delay * len(images))
        box = {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "labels": torch.tensor([1])}
        return [{**box, "scores": torch.tensor([0.5])} for _ in images]


def _evaluate_worker(rank: int, world: int, port: int, root: str, ann_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from deformable.data import CocoDetection
    from deformable.engine.trainer import evaluate

    _join(port, rank, world)
    try:
        dataset = CocoDetection(root, ann_file)
        cfg = load_config(None, ["batch_size=1", "amp=none"])
        metrics = evaluate(_SlowOnRank1(rank), dataset, cfg, torch.device("cpu"))
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


@needs_fork
def test_evaluation_counts_and_times_every_process(tmp_path):
    """eval.json reported rank 0's shard size as ``images`` and rank 0's time per image."""
    root, ann_file = write_dataset(tmp_path / "data")  # two images: one per process
    args = (2, _free_port(), str(root), str(ann_file), str(tmp_path))
    mp.start_processes(_evaluate_worker, args=args, nprocs=2, join=True, start_method="fork")
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["images"] == 2
        # rank 1's 0.1 s for its image and rank 0's ~0 s for its own: ~50 ms per image
        assert 45 <= report["inference_ms_per_image"] < 1000


def test_an_optimizer_state_of_other_groups_is_a_clear_error(tmp_path):
    """A checkpoint whose optimizer has other parameter groups (an earlier version's grouping) cannot
    continue: the error names the file and the cause, not only PyTorch's group count."""
    cfg = _classifier_config(tmp_path / "run")
    run = TrainingRun(cfg, _tiny_model(), torch.device("cpu"), lambda it: 1.0, 0, 1, resume=False)
    _one_step(run, torch.randn(4, 1, 4, 4))
    run.finish(None)
    path = tmp_path / "run" / CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    state["optimizer"]["param_groups"].append(dict(state["optimizer"]["param_groups"][0], params=[]))
    torch.save(state, path)
    more = _classifier_config(tmp_path / "run", iterations=2)
    with pytest.raises(ValueError, match=r"optimizer state does not fit this version's parameter groups"):
        TrainingRun(more, _tiny_model(), torch.device("cpu"), lambda it: 1.0, 0, 1, resume=True)
