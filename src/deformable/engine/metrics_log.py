"""Training records: one JSON line each in ``metrics.jsonl``, and TensorBoard scalars when installed."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .checkpointing import atomic_write_text

__all__ = ["MetricsLog", "read_records"]


class MetricsLog:
    """Appends records (dicts with an ``"iteration"``) to ``out_dir/metrics.jsonl``; with
    ``tensorboard=True`` and the ``tensorboard`` package installed, also writes every finite number
    in a record as a scalar named by its key path (``loss``, ``eval/bbox/AP``) to ``out_dir/tb``.

    The JSON lines are the record of truth (the demo's curves read them); TensorBoard is for watching
    a run. A fresh run (``resume_from=None``) starts an empty file. A run resumed from a checkpoint
    of iteration ``resume_from`` keeps the records up to that iteration and drops the later ones,
    which were written after the checkpoint and are about to be redone, so every iteration is
    logged once however often the run was interrupted.
    """

    def __init__(
        self, out_dir: str | Path, tensorboard: bool = True, *, resume_from: int | None = None
    ) -> None:
        if resume_from is not None and (not _is_iteration(resume_from)):
            raise ValueError(f"resume_from must be None or an int >= 0 (an iteration), got {resume_from!r}")
        self.path = Path(out_dir) / "metrics.jsonl"
        if resume_from is None:
            self.path.write_text("")
        else:
            self.discard(lambda record: record["iteration"] > resume_from)
        # TensorBoard hides the events of earlier writers in the folder from this step on.
        purge_step = 0 if resume_from is None else resume_from + 1
        self._writer = _tensorboard_writer(Path(out_dir) / "tb", purge_step) if tensorboard else None

    @property
    def tensorboard(self) -> bool:
        """Whether scalars also go to TensorBoard."""
        return self._writer is not None

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record``, a JSON-serialisable dict with an int ``"iteration"`` >= 0 (a record without
        one could not be read back)."""
        if not isinstance(record, dict) or not _is_iteration(record.get("iteration")):
            got = record.get("iteration") if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"record must be a dict with an int 'iteration' >= 0, got {got!r}")
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            step = int(record["iteration"])
            for name, value in _scalars(record):
                if name != "iteration":
                    self._writer.add_scalar(name, value, step)

    def discard(self, drop: Callable[[dict[str, Any]], bool]) -> int:
        """Remove the records for which ``drop`` is true, and any torn line a killed run left; the
        file is rewritten atomically, so a crash meanwhile leaves the old one. Returns how many
        lines went."""
        if not self.path.exists():
            return 0
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if (record := _parse(line)) and not drop(record)]
        if len(kept) < len(lines):
            atomic_write_text("".join(line + "\n" for line in kept), self.path)
        return len(lines) - len(kept)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` in file order (none when it does not exist), skipping a
    line torn by a killed run."""
    path = Path(path)
    if not path.exists():
        return []
    return [record for record in map(_parse, path.read_text().splitlines()) if record]


def _parse(line: str) -> dict[str, Any] | None:
    """The record on ``line``, or None when it is not a JSON object with an integer iteration."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
        return None
    return record


def _is_iteration(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensorboard_writer(log_dir: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is optional
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(key path, value) for every finite int/float leaf of a nested dict (bools excluded)."""
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _scalars(value, f"{name}/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            yield name, float(value)
