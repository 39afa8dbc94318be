"""MetricsLog: JSON lines always, TensorBoard scalars when the package is installed."""

from __future__ import annotations

import json
import sys
import types
from typing import ClassVar

import pytest

from deformable.engine.metrics_log import MetricsLog


class _Writer:
    """Records what a torch.utils.tensorboard.SummaryWriter would be given."""

    instances: ClassVar[list[_Writer]] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
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
