"""MetricsLog: JSON lines always, TensorBoard scalars when the package is installed; a fresh run starts a
new log and a resumed one drops what was logged after its checkpoint, so every iteration is logged once."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from deformable.engine.config import TrainConfig
from deformable.engine.demo import _read_losses
from deformable.engine.loop import CHECKPOINT_NAME, TrainingRun
from deformable.engine.metrics_log import MetricsLog, read_records


class _Writer:
    """Records what a torch.utils.tensorboard.SummaryWriter would be given."""

    instances: ClassVar[list[_Writer]] = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir = log_dir
        self.purge_step = purge_step
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        _Writer.instances.append(self)

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.scalars.append((name, value, step))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_tensorboard(monkeypatch):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = _Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    _Writer.instances.clear()
    return _Writer.instances


def test_records_go_to_json_lines_and_numbers_to_tensorboard(tmp_path, fake_tensorboard):
    log = MetricsLog(tmp_path, tensorboard=True)
    assert log.tensorboard
    log.write({"iteration": 10, "loss": 1.5, "lr": 0.01, "note": "text", "flag": True})
    log.write({"iteration": 20, "eval": {"bbox": {"AP": 0.25, "APl": float("nan")}, "images": 16}})
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["loss"] == 1.5 and lines[1]["eval"]["bbox"]["AP"] == 0.25
    (writer,) = fake_tensorboard
    assert writer.log_dir == str(tmp_path / "tb") and writer.closed
    assert writer.scalars == [
        ("loss", 1.5, 10), ("lr", 0.01, 10), ("eval/bbox/AP", 0.25, 20), ("eval/images", 16.0, 20),
    ]  # fmt: skip


def test_without_tensorboard_only_json_lines(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails, as when not installed
    log = MetricsLog(tmp_path)
    assert not log.tensorboard
    log.write({"iteration": 1, "loss": 2.0})
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"iteration": 1, "loss": 2.0}
    assert not (tmp_path / "tb").exists()


def test_switched_off_by_the_config_key(tmp_path, fake_tensorboard):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write({"iteration": 1, "loss": 2.0})
    assert not log.tensorboard and not fake_tensorboard


def _write_lines(path: Path, *records: dict, torn: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


def _iterations(path: Path) -> list[tuple[int, str]]:
    """(iteration, "eval" or "train") of every line of a metrics.jsonl."""
    return [(r["iteration"], "eval" if "eval" in r else "train") for r in map(json.loads, path.open())]


def test_a_fresh_run_starts_an_empty_log(tmp_path, fake_tensorboard):
    _write_lines(tmp_path / "metrics.jsonl", {"iteration": 1, "loss": 9.0}, {"iteration": 2, "loss": 8.0})
    log = MetricsLog(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    log.write({"iteration": 1, "loss": 1.0})
    assert read_records(tmp_path / "metrics.jsonl") == [{"iteration": 1, "loss": 1.0}]
    assert fake_tensorboard[0].purge_step == 0  # TensorBoard hides the earlier run's scalars too


def test_a_resumed_run_drops_the_records_after_its_checkpoint(tmp_path, fake_tensorboard):
    path = tmp_path / "metrics.jsonl"
    records = [{"iteration": i, "loss": float(i)} for i in range(1, 7)]
    _write_lines(path, *records[:4], {"iteration": 4, "eval": {"AP": 0.5}}, *records[4:], torn='{"itera')
    path.chmod(0o644)
    log = MetricsLog(tmp_path, resume_from=4)
    assert _iterations(path) == [(1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "eval")]
    assert path.stat().st_mode & 0o777 == 0o644
    log.write({"iteration": 5, "loss": 0.5})
    assert _iterations(path)[-1] == (5, "train") and len(_iterations(path)) == 6
    assert fake_tensorboard[0].purge_step == 5
    assert not list(tmp_path.glob(".*.tmp"))


def test_resuming_without_a_log_or_with_nothing_to_drop(tmp_path):
    MetricsLog(tmp_path, tensorboard=False, resume_from=3)
    assert not (tmp_path / "metrics.jsonl").exists()
    _write_lines(tmp_path / "metrics.jsonl", {"iteration": 1, "loss": 1.0})
    log = MetricsLog(tmp_path, tensorboard=False, resume_from=3)
    assert log.discard(lambda r: r["iteration"] > 3) == 0
    assert read_records(tmp_path / "metrics.jsonl") == [{"iteration": 1, "loss": 1.0}]


def test_a_crash_while_trimming_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, *({"iteration": i, "loss": 1.0} for i in range(1, 5)))
    before = path.read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        MetricsLog(tmp_path, tensorboard=False, resume_from=2)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left behind


def test_demo_curves_keep_the_last_record_of_each_iteration(tmp_path):
    _write_lines(
        tmp_path / "metrics.jsonl",
        {"iteration": 1, "loss": 3.0},
        {"iteration": 2, "loss": 2.0},
        {"iteration": 2, "eval": {"AP": 0.1}},
        {"iteration": 1, "loss": 2.5},
        torn='{"iteration": 3, "lo',
    )
    assert _read_losses(tmp_path) == ([1, 2], [2.5, 2.0])
    assert _read_losses(tmp_path / "missing") == ([], [])


def _run(out_dir: Path, resume: bool, steps: int, iterations: int = 4) -> TrainingRun:
    """``steps`` steps (at most) of a tiny linear model under the engine's TrainingRun, logging every
    iteration, a checkpoint every 2, finishing (with an evaluation) when it reaches ``iterations``."""
    cfg = TrainConfig(
        out_dir=str(out_dir), iterations=iterations, checkpoint_every=2, log_every=1, progress=False,
        tensorboard=False, device="cpu", lr=0.1, warmup_iterations=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    run = TrainingRun(cfg, model, torch.device("cpu"), lambda it: 1.0, 0, 1, resume)
    while run.iteration < min(iterations, run.start + steps):
        loss = model(torch.ones(1, 2)).pow(2).sum()
        run.step(loss, {"loss": float(loss.detach())})
    if run.iteration == iterations:
        run.finish(lambda: {"AP": 0.5})
    return run


def test_training_runs_log_every_iteration_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    once = [(1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "eval")]
    _run(tmp_path, resume=False, steps=4)
    assert _iterations(path) == once
    _run(tmp_path, resume=False, steps=4)  # the same folder again without resuming: a new log
    assert _iterations(path) == once
    _run(tmp_path, resume=False, steps=3)  # "killed" after iteration 3; its checkpoint is at 2
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["iteration"] == 2
    assert _run(tmp_path, resume=True, steps=4).start == 2
    assert _iterations(path) == once
    _run(tmp_path, resume=True, steps=4)  # resuming a finished run only redoes its final evaluation
    assert _iterations(path) == once


def test_a_fresh_run_discards_the_checkpoint_of_an_earlier_run(tmp_path):
    """Killed before its first checkpoint, a fresh run must not leave the earlier run's checkpoint for a
    later --resume to take as its own."""
    _run(tmp_path, resume=False, steps=4)
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    _run(tmp_path, resume=False, steps=1)  # "killed" after iteration 1, before its checkpoint at 2
    assert not (tmp_path / CHECKPOINT_NAME).exists() and not (tmp_path / "eval.json").exists()
    assert _run(tmp_path, resume=True, steps=4).start == 0


def test_resume_refuses_a_checkpoint_written_under_another_config(tmp_path):
    _run(tmp_path, resume=False, steps=3)  # checkpoint at iteration 2, lr 0.1
    cfg = TrainConfig(
        out_dir=str(tmp_path), iterations=6, checkpoint_every=2, log_every=1, progress=False,
        tensorboard=False, device="cpu", lr=0.5, warmup_iterations=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"another config \(lr: 0.1 -> 0.5\)"):
        TrainingRun(cfg, torch.nn.Linear(2, 1), torch.device("cpu"), lambda it: 1.0, 0, 1, True)
    cfg.lr = 0.1  # a longer schedule is a legitimate resume
    assert TrainingRun(cfg, torch.nn.Linear(2, 1), torch.device("cpu"), lambda it: 1.0, 0, 1, True).start == 2


def test_an_evaluation_killed_at_a_checkpoint_iteration_is_redone_on_resume(tmp_path):
    """The evaluation of iteration k runs before k's checkpoint: killed while evaluating, the run
    resumes from the checkpoint before k and evaluates k again."""

    class Killed(Exception):
        pass

    def killed_evaluation():
        raise Killed

    cfg = TrainConfig(
        out_dir=str(tmp_path), iterations=6, checkpoint_every=2, eval_every=4, log_every=1, progress=False,
        tensorboard=False, device="cpu", lr=0.1, warmup_iterations=0,
    )  # fmt: skip
    model = torch.nn.Linear(2, 1)
    run = TrainingRun(cfg, model, torch.device("cpu"), lambda it: 1.0, 0, 1, False)
    with pytest.raises(Killed):
        while True:
            run.step(model(torch.ones(1, 2)).pow(2).sum(), {"loss": 0.0}, killed_evaluation)
    assert run.iteration == 4
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["iteration"] == 2


def test_records_without_an_iteration_are_refused(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for record in ({"loss": 1.0}, {"iteration": "3"}, None):  # were written, then never read back
        with pytest.raises(ValueError, match="record must be a dict with an int 'iteration'"):
            log.write(record)
    log.write({"iteration": 1, "loss": 0.5})
    assert read_records(tmp_path / "metrics.jsonl") == [{"iteration": 1, "loss": 0.5}]
    with pytest.raises(ValueError, match="resume_from must be None or an int"):  # '>' not supported
        MetricsLog(tmp_path, tensorboard=False, resume_from="1")
