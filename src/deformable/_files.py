"""Reading and writing files safely: ``torch.load``'s many failures turned into clear errors, and atomic
writes (a temporary file beside the target, flushed and renamed over it) so that an interrupted write
never leaves a file that looks valid."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
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


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    return _atomic_write(path, "wb", lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    return _atomic_write(path, "w", lambda handle: handle.write(text))


def strict_json(obj: Any) -> str:
    """``obj`` as indented JSON that any parser reads: NaN and infinities (a COCO metric undefined for
    want of ground truth is NaN) become null, which Python's ``json`` would write as bare ``NaN``."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(obj), indent=2, allow_nan=False)


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
    tmp.chmod(0o666 & ~_umask())


def _umask() -> int:
    """The process's umask: read from /proc on Linux, since setting it to read it back would race with
    other threads creating files; elsewhere, set and restored at once."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask
