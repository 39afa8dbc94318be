"""Constants and errors shared by the exporters (no optional dependency imported here)."""

from __future__ import annotations

#: Minimum ai.onnx opset: DeformConv appeared in opset 19.
MIN_OPSET = 19

#: The torch.library namespace of this library's custom ops.
NAMESPACE = "deformable"


class UnsupportedOperatorError(RuntimeError):
    """A model uses an operator that cannot be exported to standard ONNX; the message names it."""
