"""The device the Triton kernel tests run on (CUDA when present, else the CPU through Triton's
interpreter), and their module-level skip: importing this skips the importing test module when Triton
cannot run there. Import it before any ``deformable.ops._triton`` module."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from deformable.ops._backend import triton_unavailable_reason

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_reason = triton_unavailable_reason(DEVICE)
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)
