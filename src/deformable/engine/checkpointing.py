"""Training checkpoints: atomic writes, weights-only reads, exact RNG round trips.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over the
final name, so an interrupted write never leaves a file that looks valid. Everything in it is a
tensor or a plain Python value, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import load_weights_only

FORMAT = "deformable-train-v1"


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    return _atomic_write(path, "wb", lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    return _atomic_write(path, "w", lambda handle: handle.write(text))


def _atomic_write(path: str | Path, mode: str, write: Callable[[Any], object]) -> Path:
    """``write(handle)`` into a flushed temporary file beside ``path``, then rename it over ``path``: a
    reader sees the old file or the whole new one, never part of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        _usual_permissions(Path(tmp), path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _usual_permissions(tmp: Path, path: Path) -> None:
    """``mkstemp`` makes a file its owner's alone: give it the permissions of the file it replaces, or
    else those ``open`` would (0666 less the umask), so that shared caches stay readable."""
    if path.exists():
        shutil.copymode(path, tmp)
        return
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)


def rng_state() -> dict[str, Any]:
    """The state of every random generator a training step touches, as weights-only-safe values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by the trainer (weights only); a clear error for anything else."""
    path = Path(path)
    data = load_weights_only(path, "training checkpoint")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a deformable training checkpoint (format {FORMAT!r} expected)")
    return data
