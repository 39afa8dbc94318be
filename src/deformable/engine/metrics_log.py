"""Training records: one JSON line each in ``metrics.jsonl``, and TensorBoard scalars when installed."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog"]


class MetricsLog:
    """Appends records (dicts with an ``"iteration"``) to ``out_dir/metrics.jsonl``; with
    ``tensorboard=True`` and the ``tensorboard`` package installed, also writes every finite number
    in a record as a scalar named by its key path (``loss``, ``eval/bbox/AP``) to ``out_dir/tb``.

    The JSON lines are the record of truth (the demo's curves read them); TensorBoard is for watching
    a run. Appending keeps the records of an interrupted run, which a resumed run continues.
    """

    def __init__(self, out_dir: str | Path, tensorboard: bool = True) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self._writer = _tensorboard_writer(Path(out_dir) / "tb") if tensorboard else None

    @property
    def tensorboard(self) -> bool:
        """Whether scalars also go to TensorBoard."""
        return self._writer is not None

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            step = int(record["iteration"])
            for name, value in _scalars(record):
                if name != "iteration":
                    self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is optional
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(key path, value) for every finite int/float leaf of a nested dict (bools excluded)."""
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _scalars(value, f"{name}/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            yield name, float(value)
