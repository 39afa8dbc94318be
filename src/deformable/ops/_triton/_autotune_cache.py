"""The autotuner's results kept across processes (``DEFORMABLE_TRITON_AUTOTUNE=1`` only).

Autotuning benchmarks a few candidate configurations per kernel the first time each (shape, dtype,
flags) key is seen: seconds per key, which every new process would pay again. The winners are kept
in a JSON file instead, per scope: the GPU model, the Triton version and a hash of the kernels' source
(a configuration tuned for one says nothing about another). ``DEFORMABLE_TRITON_AUTOTUNE_CACHE`` names
the file, by default ``$XDG_CACHE_HOME/deformable/triton_autotune.json`` (``~/.cache`` without
XDG_CACHE_HOME); an empty value keeps results in memory only.

Writes are atomic and re-read the file first, keeping what other processes wrote (best effort: two
processes storing at the same instant may lose one entry, which is then tuned again). A file that
cannot be parsed is ignored with a warning and replaced by the next write; a file of another format
(another version of this package) is used by neither and left as it is. An entry that is not a valid
configuration, or whose trial launch fails, is ignored with a warning and tuned again.

File layout: ``{"format": 1, "scopes": {scope: {key: [block_m, block_n, block_k, warps, stages,
splits, variant]}}}``, variant 0 or 1: the kernel's alternative form (the weight kernel's go_first, the
data kernel's deferred_sums, the forward's flat loop), 2: the forward's flat loop with its channel
blocks fastest; entries without it, of earlier versions, mean 0.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from ..._files import atomic_write_text

CACHE_ENV = "DEFORMABLE_TRITON_AUTOTUNE_CACHE"
_FORMAT = 1
_REQUIRED = 6  # block_m, block_n, block_k, num_warps, num_stages, splits; then the variant flag

__all__ = ["CACHE_ENV", "cache_path", "lookup", "store"]


def cache_path() -> Path | None:
    """The cache file, or None when ``DEFORMABLE_TRITON_AUTOTUNE_CACHE`` is set to an empty value."""
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return Path(configured).expanduser() if configured.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deformable" / "triton_autotune.json"


def _read(path: Path) -> dict[str, dict[str, list]] | None:
    """The scopes of the file at ``path``: {} if there is none or it cannot be parsed (with a warning),
    None if it holds another format (not to be overwritten)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):  # no file yet (the write will say if it cannot be made)
        return {}
    except (OSError, ValueError) as error:
        warnings.warn(f"deformable: ignoring the unreadable autotune cache {path} ({error})", stacklevel=3)
        return {}
    if (
        not isinstance(data, dict)
        or data.get("format") != _FORMAT
        or not isinstance(data.get("scopes"), dict)
    ):
        message = (
            f"deformable: not using the autotune cache {path}: not format {_FORMAT} (another version's?)"
        )
        warnings.warn(message, stacklevel=3)
        return None
    return {scope: keys for scope, keys in data["scopes"].items() if isinstance(keys, dict)}


def _valid(entry) -> bool:
    """Six positive ints, power-of-two block sizes and warps (at most 32), then optionally a variant
    0, 1 or 2: what a launch needs (the caller's Config and trial launch test the rest)."""
    if not isinstance(entry, list) or len(entry) not in (_REQUIRED, _REQUIRED + 1):
        return False
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in entry):
        return False
    if not all(v > 0 for v in entry[:_REQUIRED]) or entry[_REQUIRED:] not in ([], [0], [1], [2]):
        return False
    return all(v & (v - 1) == 0 for v in entry[:4]) and entry[3] <= 32


def lookup(scope: str, key: str) -> tuple[int, ...] | None:
    """The stored configuration fields of ``key`` in ``scope``, or None."""
    path = cache_path()
    if path is None:
        return None
    entry = (_read(path) or {}).get(scope, {}).get(key)
    if entry is None:
        return None
    if not _valid(entry):
        warnings.warn(
            f"deformable: ignoring the invalid autotune cache entry {key!r}: {entry!r}", stacklevel=2
        )
        return None
    return tuple(entry)


def store(scope: str, key: str, fields: tuple[int, ...]) -> None:
    """Add ``key`` -> ``fields`` to ``scope`` in the cache file (re-read first, so that entries other
    processes wrote are kept); a file that cannot be written only costs a warning."""
    path = cache_path()
    if path is None:
        return
    scopes = _read(path)
    if scopes is None:  # another format: left to the version that wrote it
        return
    scopes.setdefault(scope, {})[key] = list(fields)
    try:
        atomic_write_text(json.dumps({"format": _FORMAT, "scopes": scopes}, indent=1, sort_keys=True), path)
    except OSError as error:
        warnings.warn(f"deformable: could not write the autotune cache {path} ({error})", stacklevel=2)
