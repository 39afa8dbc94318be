"""Reading PyTorch files safely: one place that turns ``torch.load``'s many failures into clear errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def load_weights_only(path: str | os.PathLike, what: str = "PyTorch checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that name the file.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file cannot be read as a weights-only PyTorch file (truncated, corrupt, or
            holding arbitrary Python objects); the message says which file and why.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors alike
        raise ValueError(f"{path} is not a readable {what} (weights_only=True): {error}") from error
