"""The device the Triton kernel tests run on (CUDA when present, else the CPU through Triton's
interpreter), and their module-level skip: importing this skips the importing test module when Triton
cannot run there. Import it before any ``deformable.ops._triton`` module. Also the switch to the fused
backward that the CPU and CUDA tests share."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from deformable.ops._backend import triton_unavailable_reason

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_reason = triton_unavailable_reason(DEVICE)
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)


def fused_kernels_launched(monkeypatch) -> list:
    """Turns the fused backward on (``deform_conv.FUSED_BACKWARD``); returns the list of the kernels
    launched from now on."""
    from deformable.ops._triton import deform_conv as tdc

    monkeypatch.setattr(tdc, "FUSED_BACKWARD", True)
    launched, run = [], tdc._run

    def spy(kernel, spec, tensors):
        launched.append(kernel)
        run(kernel, spec, tensors)

    monkeypatch.setattr(tdc, "_run", spy)
    return launched
