"""Backend selection for the deformable operators.

Three implementations stand behind every operator:

``"reference"``
    Readable pure-PyTorch code, differentiated by autograd: the executable specification.
``"aten"``
    The fast vectorised path built from ATen kernels (embedding_bag gathers + a strided
    convolution), chunked under a memory budget, with its own deterministic backward. Runs on any
    device PyTorch runs on; it is the automatic choice on CPU.
``"triton"``
    Fused Triton kernels; the automatic choice for CUDA tensors when Triton is installed. With
    ``TRITON_INTERPRET=1`` it also runs on CPU tensors through Triton's interpreter (that is how
    CI checks it).

The choice is: the ``backend=`` argument, else the ``DEFORMABLE_BACKEND`` environment variable,
else automatic. An explicitly requested backend that cannot run raises; nothing falls back silently.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("reference", "aten", "triton")
ENV_VAR = "DEFORMABLE_BACKEND"


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is never imported here)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels are to run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or None when it can."""
    if not triton_available():
        return "the 'triton' package is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreted():
        return None
    return f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got device {device}"


def check_backend_name(backend: str | None, source: str = "backend") -> str | None:
    """``backend`` itself if it names a backend (or is None); a ValueError otherwise (a TypeError for
    what is not a string at all), naming ``source``. Modules check this at construction, so a typo
    fails there rather than at the first forward."""
    if backend is not None and not isinstance(backend, str):
        kind = type(backend).__name__
        raise TypeError(f"{source} must be one of {BACKENDS} or None, got {kind} {backend!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """Return the concrete backend name for tensors on ``device``.

    Raises:
        ValueError: ``backend`` (or ``DEFORMABLE_BACKEND``) names no backend, or names one that
            cannot run on ``device``.
        TypeError: ``backend`` is not a string, or ``device`` is neither a ``torch.device`` nor a
            device string.
    """
    if not isinstance(device, torch.device):
        if not isinstance(device, str):
            raise TypeError(f"device must be a torch.device or a str, got {type(device).__name__}")
        try:
            device = torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"device: {error}") from None
    source = "backend"
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = ENV_VAR
    if backend is None:
        if device.type == "cuda" and triton_unavailable_reason(device) is None:
            return "triton"
        return "aten"
    check_backend_name(backend, source)
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"{source}='triton' cannot run: {reason}")
    return backend
