"""Training checkpoints: atomic writes, weights-only reads, exact RNG round trips.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over the
final name, so an interrupted write never leaves a file that looks valid. Everything in it is a
tensor or a plain Python value, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import atomic_save as atomic_save  # re-exported: the writers live in deformable._files
from .._files import atomic_write_text as atomic_write_text
from .._files import load_weights_only

FORMAT = "deformable-train-v1"
# What a resumed run restores from a checkpoint (the trainer writes them all).
_REQUIRED = ("iteration", "model", "optimizer", "scheduler", "scaler", "rng")


def rng_state() -> dict[str, Any]:
    """The state of every random generator a training step touches, as weights-only-safe values."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the global generator is an MT19937: its legacy state is a tuple
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
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ValueError(f"{path} is an incomplete training checkpoint: it lacks {missing}")
    if not isinstance(data["iteration"], int) or data["iteration"] < 0:
        raise ValueError(f"{path}: 'iteration' must be an int >= 0, got {data['iteration']!r}")
    return data
