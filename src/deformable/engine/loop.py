"""The machinery every training run shares: processes, data order, optimisation, checkpoints, logs.

:class:`TrainingRun` holds one run's optimizer (SGD with the paper's parameter groups), learning-rate
schedule, AMP scaler, data-parallel wrapper, metrics log and progress bar; it restores all of them from
the last checkpoint when resuming, so that the next iterations see exactly the batches, augmentations
and updates an uninterrupted run would. The detector trainer (:mod:`.trainer`) and the classifier
trainer (:mod:`.classifier`) differ only in data, model, loss and evaluation.

Configs are duck-typed: both :class:`~.config.TrainConfig` and :class:`~.config.ClassifierConfig` have
the fields used here (lr, momentum, weight_decay, amp, clip_grad_norm, seed, batch_size, iterations,
workers, out_dir, checkpoint_every, log_every, eval_every, progress, tensorboard, device).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import models
from .._files import atomic_write_text, load_weights_only, strict_json
from ..data._checks import is_int
from .checkpointing import FORMAT, atomic_save, load_training_checkpoint, rng_state, set_rng_state
from .config import dump_config
from .metrics_log import MetricsLog

CHECKPOINT_NAME = "checkpoint_last.pth"
FINAL_NAME = "model_final.pth"
# What the checkpoint and model_final.pth hold besides a run's metadata.
_RESERVED_KEYS = frozenset(
    {"format", "iteration", "model", "optimizer", "scheduler", "scaler", "rng", "train_seconds", "config",
     "world_size"}
)  # fmt: skip

__all__ = [
    "CHECKPOINT_NAME",
    "FINAL_NAME",
    "IterationBatchSampler",
    "SeededSamples",
    "TrainingRun",
    "autocast_for",
    "barrier",
    "broadcast_buffers",
    "check_out_dir",
    "ddp_device_ids",
    "device_for",
    "eval_indices",
    "init_distributed",
    "is_main",
    "local_rank",
    "read_model_file",
]

# ------------------------------------------------------------------------------------------------
# Processes


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def eval_indices(size: int, max_images: int | None, spread: bool = False) -> list[int]:
    """This process's share of an evaluation over ``max_images`` of ``size`` items (all when None):
    every world-th index from its rank on. The first ``max_images``, or with ``spread`` as many spaced
    evenly over all ``size`` (a dataset listed in class order, as ImageFolder's: the first items
    would be the first classes alone)."""
    if not is_int(size) or size < 0:
        raise ValueError(f"size must be an int >= 0, got {size!r}")
    if max_images is not None and (not is_int(max_images) or max_images <= 0):
        raise ValueError(f"max_images must be None (all) or a positive int, got {max_images!r}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if max_images is None or max_images >= size:
        chosen = list(range(size))
    elif spread:
        chosen = [i * size // max_images for i in range(max_images)]
    else:
        chosen = list(range(max_images))
    return chosen[rank::world]


def read_model_file(path: str | Path) -> dict[str, Any]:
    """A ``model_final.pth`` / ``checkpoint_last.pth`` (weights only), checked to hold a ``model``.

    Raises:
        FileNotFoundError: no such file. ValueError: the file is not a readable model file.
    """
    path = Path(path)
    data = load_weights_only(path, "model file")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{path} holds no 'model' state dict")
    return data


def model_source(
    source: str | Path | dict[str, Any], key: str, classifier: bool, need_config: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state dict, config dict or None) of a model file (``source``: its path, or what
    :func:`read_model_file` read from it), checked to hold the ``key`` weight of a classifier or a
    detector and, with ``need_config``, a config of that task.

    Raises:
        ValueError: naming the file and what it lacks.
    """
    data = source if isinstance(source, dict) else read_model_file(source)
    where = "source" if isinstance(source, dict) else str(source)
    state, config = data.get("model"), data.get("config")
    if not isinstance(state, dict):
        raise ValueError(f"{where} holds no 'model' state dict")
    if need_config:
        if not isinstance(config, dict):
            raise ValueError(f"{where} holds no 'config' mapping to build the model from: pass cfg")
        if (config.get("task") == "classification") != classifier:
            found = "an image classifier" if not classifier else "a detector"
            loader = "load_trained_classifier" if not classifier else "load_trained_model"
            raise ValueError(f"{where} holds {found} (its config's task): load it with {loader}")
    if key not in state:
        what = "an image classifier" if classifier else "a detector"
        raise ValueError(f"{where}: the 'model' state dict has no {key!r}, so it is not {what}'s")
    return state, config if isinstance(config, dict) else None


# Config keys a resumed run may change: how long and how visibly it runs, where its files live, and
# the starting weights (the checkpoint holds the trained ones).
RESUMABLE_CHANGES = frozenset(
    {
        "iterations", "lr_steps", "progress", "workers", "log_every", "checkpoint_every", "eval_every",
        "eval_max_images", "tensorboard", "device", "out_dir", "data_dir", "weights_backbone",
    }
)  # fmt: skip


def _check_same_run(saved: dict[str, Any] | None, current: dict[str, Any], path: Path) -> None:
    """Refuse to resume from a checkpoint written under another config (beyond RESUMABLE_CHANGES)."""
    if saved is None:
        return
    changed = sorted(
        key for key in set(saved) | set(current)
        if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)
    )  # fmt: skip
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed[:5])
        raise ValueError(
            f"{path} was written by a run with another config ({details}): resuming would continue that "
            "run under this config. Start afresh (no --resume, or demo --restart) or use another out_dir."
        )


def _check_same_world(state: dict[str, Any], world: int, path: Path) -> None:
    """Refuse to resume a checkpoint written by another number of processes.

    The data order shards every epoch over the processes and the effective batch is ``batch_size`` x
    processes, so a resumed run with another count would not continue the saved one. Checkpoints
    written before the count was saved (no ``world_size``) are accepted, unless their per-process
    random states show fewer processes than there are now (their ranks would have none to restore).
    """
    saved = state.get("world_size")
    if saved is None:  # a single process saves its random state as a dict, several as a list of them
        rng = state.get("rng")
        inferred = len(rng) if isinstance(rng, list) else 1 if isinstance(rng, dict) else None
        if inferred is not None and inferred < world:
            saved = inferred
    if saved is not None and saved != world:
        raise ValueError(
            f"{path} was saved by a run of {saved} processes, now {world}: the run's data sharding and "
            f"effective batch (batch_size x processes) depend on it. Resume with {saved} processes "
            "(torchrun --nproc_per_node) or start afresh (no --resume, or another out_dir)."
        )


def _load_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any], path: Path) -> None:
    """``optimizer.load_state_dict(saved)``, or a ValueError saying why a checkpoint's optimizer cannot
    continue in this one (PyTorch's own message names neither the file nor the cause)."""
    groups = [group["name"] for group in optimizer.param_groups if "name" in group]
    try:
        optimizer.load_state_dict(saved)
    except ValueError as error:
        raise ValueError(
            f"{path}: its optimizer state does not fit this version's parameter groups {groups} ({error}). "
            "The grouping changed since the checkpoint was written (offset-branch biases got a group of "
            "their own): resume with the version that wrote it, or start afresh from the run's "
            "model_final.pth weights."
        ) from error


def device_for(cfg) -> torch.device:
    """The config's ``device`` ("auto": CUDA when available) for this process.

    Under torchrun (``WORLD_SIZE`` > 1) a CUDA device is this process's own GPU, ``cuda:LOCAL_RANK``,
    which is also made the current device (before the process group is joined, so that NCCL and every
    ``torch.cuda`` call without an index use it); one process, or the CPU, gets the plain device.
    """
    if cfg.device == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    elif cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'device' is 'cuda' but no CUDA device is available")
    else:
        kind = cfg.device
    if kind != "cuda" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return torch.device(kind)
    device = torch.device("cuda", local_rank(torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def local_rank(devices: int) -> int:
    """This process's index among the processes of its node (torchrun's ``LOCAL_RANK``), checked to
    name one of the node's ``devices`` GPUs.

    Raises:
        ValueError: ``LOCAL_RANK`` is unset or not an int >= 0, or there are fewer GPUs than processes.
    """
    text = os.environ.get("LOCAL_RANK")
    value = int(text) if text is not None and text.strip().isdigit() else None
    if value is None:
        raise ValueError(
            f"LOCAL_RANK must be an int >= 0 when WORLD_SIZE > 1 (torchrun sets it), got {text!r}: "
            "without it every process would use the same GPU"
        )
    if value >= devices:
        raise ValueError(
            f"LOCAL_RANK is {value} but this node has {devices} CUDA device(s): start at most {devices} "
            "processes per node (torchrun --nproc_per_node)"
        )
    return value


def ddp_device_ids(device: torch.device) -> list[int] | None:
    """DistributedDataParallel's ``device_ids`` for a model on ``device``: ``[index]`` of its GPU (the
    current one when ``device`` has no index), None on the CPU."""
    if device.type != "cuda":
        return None
    return [device.index if device.index is not None else torch.cuda.current_device()]


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics, ...) of ``model`` to every process, in
    place; nothing without an initialised process group of more than one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def autocast_for(cfg, device: torch.device):
    """``torch.autocast`` in the config's ``amp`` dtype, or nothing for "none"."""
    if cfg.amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def check_out_dir(path: Path) -> None:
    """Create ``path`` and prove it writable, or raise a ValueError naming it (before any training)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"  # one per process: ranks share the folder
        probe.write_text("ok")
        probe.unlink(missing_ok=True)
    except OSError as error:
        raise ValueError(f"output folder {path} is not writable: {error}") from error


# ------------------------------------------------------------------------------------------------
# Data order


class SizedDataset(Protocol):
    """A map-style dataset that knows its length (what the training loop samples from)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


class SeededSamples(Dataset):
    """Wraps a dataset so that item ``(epoch, index)`` is transformed under its own seed."""

    def __init__(self, dataset: SizedDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033 + index)
            return self.dataset[index]


class IterationBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` for iterations ``[start, stop)``, sharded over ranks.

    Every epoch is a fresh permutation drawn from ``seed`` and the epoch number; each rank takes
    every ``world``-th index of it and drops the incomplete last batch.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1
    ) -> None:
        if not is_int(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        for name, value, low in (
            ("size", size, 0), ("batch_size", batch_size, 1), ("start", start, 0), ("stop", stop, 0),
            ("rank", rank, 0), ("world", world, 1),
        ):  # fmt: skip
            if not is_int(value) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if rank >= world:
            raise ValueError(f"rank must be < world ({world}), got {rank}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self.per_epoch = (size // world) // batch_size
        if self.per_epoch == 0:
            raise ValueError(
                f"the training set ({size} images) is smaller than one batch per process "
                f"(batch_size {batch_size} x {world} processes)"
            )

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, order = -1, None
        for iteration in range(self.start, self.stop):
            if iteration // self.per_epoch != epoch:
                epoch = iteration // self.per_epoch
                generator = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
                order = torch.randperm(self.size, generator=generator)[self.rank :: self.world]
            assert order is not None  # drawn at the first iteration (epoch -1 never matches)
            position = (iteration % self.per_epoch) * self.batch_size
            yield [(epoch, int(i)) for i in order[position : position + self.batch_size]]


# ------------------------------------------------------------------------------------------------
# One run


class TrainingRun:
    """Optimisation, checkpoints and logs of one run of ``model`` under ``cfg``.

    Construct it after the model (built identically on every rank) is on ``device``; it creates the
    optimizer, the ``LambdaLR`` schedule with ``lr_lambda``, the AMP scaler, restores them (and every
    random generator) from ``out_dir/checkpoint_last.pth`` when ``resume`` and that file exists, writes
    the resolved config, opens the metrics log (a fresh run starts it empty; a resumed one drops the
    records written after the checkpoint) and wraps the model for data parallelism. A checkpoint holds
    the number of processes (``world_size``) and resuming under another number is refused.
    ``metadata`` (plain values, e.g. the detector's ``categories``) is written into the checkpoint
    and ``model_final.pth`` beside the model. Then::

        for batch in run.loader(train_set, collate_fn):
            loss, scalars = ...forward of run.train_model...
            run.step(loss, scalars, evaluate)
        metrics = run.finish(evaluate if evaluate_at_end else None)

    ``run.iteration`` counts optimizer steps over all runs; ``run.seconds`` the training time of all
    runs, read at each checkpoint before writing it, so a resumed or re-run job reports its whole
    cost and the same number however often it was interrupted.
    """

    def __init__(
        self,
        cfg,
        model: nn.Module,
        device: torch.device,
        lr_lambda: Callable[[int], float],
        rank: int,
        world: int,
        resume: bool,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.model, self.device, self.rank, self.world = cfg, model, device, rank, world
        self.metadata = dict(metadata or {})
        reserved = sorted(set(self.metadata) & _RESERVED_KEYS)
        if reserved:
            raise ValueError(f"metadata must not use the model files' own keys, got {reserved}")
        self.out_dir = Path(cfg.out_dir)
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME
        self.parameters = sum(p.numel() for p in model.parameters())
        groups = models.param_groups(model, cfg.lr, cfg.weight_decay)
        self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.start, seconds_before = 0, 0.0
        resumed = resume and self.checkpoint_path.exists()
        if resumed:
            state = load_training_checkpoint(self.checkpoint_path)
            _check_same_run(state.get("config"), cfg.to_dict(), self.checkpoint_path)
            _check_same_world(state, world, self.checkpoint_path)
            model.load_state_dict(state["model"])
            _load_optimizer(self.optimizer, state["optimizer"], self.checkpoint_path)
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.start = state["iteration"]
            seconds_before = float(state.get("train_seconds", 0.0))
            set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        else:
            torch.manual_seed(cfg.seed * 31 + rank)
            if is_main():  # an earlier run's results: a later --resume must not take them for this run's
                for name in (CHECKPOINT_NAME, FINAL_NAME, "eval.json"):
                    (self.out_dir / name).unlink(missing_ok=True)
        if is_main():
            dump_config(cfg, self.out_dir / "config.yaml")
        self.train_model = model
        if world > 1:
            self.train_model = nn.parallel.DistributedDataParallel(model, device_ids=ddp_device_ids(device))
        self.iteration = self.start
        self.seconds = self._seconds_before = seconds_before
        self.log: MetricsLog | None = None  # written by the main process only
        if is_main():
            self.log = MetricsLog(self.out_dir, cfg.tensorboard, resume_from=self.start if resumed else None)
        self._progress = None
        if cfg.progress and is_main():
            from tqdm import tqdm

            name = f"train {self.out_dir.name}"
            self._progress = tqdm(total=cfg.iterations, initial=self.start, desc=name, dynamic_ncols=True)
        self._began = time.perf_counter()
        model.train()

    def loader(self, dataset: SizedDataset, collate_fn: Callable | None = None) -> DataLoader:
        """Batches for iterations ``[start, iterations)``: this rank's shard, each item under its seed."""
        cfg = self.cfg
        sampler = IterationBatchSampler(
            len(dataset), cfg.batch_size, cfg.seed, self.start, cfg.iterations, self.rank, self.world
        )
        return DataLoader(
            SeededSamples(dataset, cfg.seed),
            batch_sampler=sampler,
            collate_fn=collate_fn,
            num_workers=cfg.workers,
            # A private generator: creating the loader must not draw from the global one, or a resumed
            # run would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def step(
        self,
        loss: torch.Tensor,
        scalars: dict[str, float],
        evaluate: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """One optimizer step on ``loss``; then progress, logging (``scalars`` with the step's
        learning rate and time), a checkpoint and an evaluation where the config says."""
        cfg = self.cfg
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at iteration {self.iteration}: {scalars}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
        # The rate this step used (the first parameter group's), read before the scheduler moves on.
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.iteration += 1
        iteration, last = self.iteration, self.iteration == cfg.iterations
        if is_main():
            if self._progress is not None:
                shown = scalars["loss"] if "loss" in scalars else float(loss.detach())
                self._progress.set_postfix(loss=f"{shown:.3f}", lr=f"{lr:.2e}")
                self._progress.update(1)
            if self.log is not None and (iteration % cfg.log_every == 0 or last):
                elapsed = time.perf_counter() - self._began
                self.log.write({"iteration": iteration, "lr": lr, **scalars, "time": elapsed})
        # The evaluation comes before the checkpoint of the same iteration: a run killed while
        # evaluating resumes from the checkpoint before and evaluates again, and the checkpoint's
        # random state is the one training continues from.
        if evaluate is not None and cfg.eval_every and iteration % cfg.eval_every == 0 and not last:
            metrics = self._evaluate(evaluate)
            if self.log is not None:  # the main process
                self.log.write({"iteration": iteration, "eval": metrics})
        if iteration % cfg.checkpoint_every == 0 or last:
            self.seconds = self._seconds_before + time.perf_counter() - self._began
            self._save_checkpoint()

    def finish(self, evaluate: Callable[[], dict[str, Any]] | None) -> dict[str, Any] | None:
        """Write ``model_final.pth``; evaluate (if given) into the log and ``eval.json``; close."""
        if self._progress is not None:
            self._progress.close()
        if is_main():
            final = {"model": self.model.state_dict(), "config": self.cfg.to_dict(), **self.metadata}
            atomic_save(final, self.out_dir / FINAL_NAME)
        metrics = None
        if evaluate is not None:
            metrics = self._evaluate(evaluate)
            if self.log is not None:  # the main process
                if self.iteration == self.start:  # a finished run resumed: its final evaluation is redone
                    self.log.discard(lambda r: r["iteration"] == self.iteration and "eval" in r)
                self.log.write({"iteration": self.iteration, "eval": metrics})
                atomic_write_text(strict_json(metrics) + "\n", self.out_dir / "eval.json")
        if self.log is not None:
            self.log.close()
        barrier()
        return metrics

    def _evaluate(self, evaluate: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``evaluate()`` of the model every process holds: rank 0's, the one the files save.

        Data parallelism keeps the parameters equal, not the buffers: each process updates its
        BatchNorm running statistics on its own batches (DDP copies rank 0's only at the start of each
        forward), so they are broadcast from rank 0 first.
        """
        broadcast_buffers(self.model)
        return evaluate()

    def _save_checkpoint(self) -> None:
        states: dict[str, Any] | list[Any] = rng_state()
        if dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            states = gathered
        if is_main():
            atomic_save(
                {
                    "format": FORMAT,
                    "iteration": self.iteration,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rng": states,
                    "train_seconds": self.seconds,
                    "config": self.cfg.to_dict(),
                    "world_size": self.world,
                    **self.metadata,
                },
                self.checkpoint_path,
            )
        barrier()
