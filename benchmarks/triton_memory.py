"""Peak memory of the Triton deform_conv2d forward+backward, predicted on a machine without a GPU.

    python benchmarks/triton_memory.py [--out FILE]

The Triton backend's host code runs on CPU tensors with its kernel launches replaced by no-ops: every
buffer the wrapper allocates (channels-last copy, fp32 accumulators, gradients, split-K partial sums)
is allocated exactly as on a GPU, and ``deformable.benchmark.peak_allocated_bytes`` counts the
allocator's peak from the profiler's events. The kernels allocate nothing themselves, so this is the
figure ``torch.cuda.max_memory_allocated`` gives on a GPU for the same call (checked against the H200
run of gpu_check.py: 35.9, 109.8, 30.5 MiB here for det-c4, det-c4-s2, det-c5 in fp32 before the
backward's reordering, 35.9, 110, 30.5 MiB measured there). The anchor shapes of ``shared/anchors``,
offsets and mask given, all five gradients; as in gpu_check.py, the inputs and the output's gradient
exist before the call and are not counted.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend accepts CPU tensors

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from deformable.benchmark import (  # noqa: E402
    GPU_SHAPES,
    Shape,
    deterministic_algorithms,
    peak_allocated_bytes,
    publish,
)
from deformable.ops import deform_conv2d  # noqa: E402
from deformable.ops._triton import _launch  # noqa: E402
from deformable.ops._triton import deform_conv as triton_deform_conv  # noqa: E402


def forward_backward_peak_mib(shape: Shape, dtype: torch.dtype, deterministic: bool) -> float:
    """Allocator peak (MiB) of one forward+backward of the Triton backend, kernels not run."""
    n, c, s = shape.batch, shape.channels, shape.stride
    out_h, out_w = (shape.height - 1) // s + 1, (shape.width - 1) // s + 1

    def leaf(*size: int) -> torch.Tensor:
        return torch.zeros(size, dtype=dtype, requires_grad=True)

    x, weight, bias = leaf(n, c, shape.height, shape.width), leaf(c, c, 3, 3), leaf(c)
    offset, mask = leaf(n, 18, out_h, out_w), leaf(n, 9, out_h, out_w)
    grad_output = torch.zeros(n, c, out_h, out_w, dtype=dtype)

    def step() -> None:
        out = deform_conv2d(x, offset, weight, bias, s, 1, 1, mask, backend="triton")
        torch.autograd.grad(out, (x, offset, mask, weight, bias), grad_output)

    with deterministic_algorithms(deterministic):
        return peak_allocated_bytes(step) / 2**20


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    # No kernel runs: neither the planned launches (through _launch) nor deterministic mode's.
    saved_launch, saved_module_launch = _launch.launch, triton_deform_conv.launch
    _launch.launch = triton_deform_conv.launch = lambda *args, **kwargs: None
    try:
        lines = [
            "# Triton deform_conv2d forward+backward: peak memory, predicted without a GPU",
            "",
            f"- torch {torch.__version__}, Python {platform.python_version()}, "
            f"{datetime.date.today().isoformat()}; `python benchmarks/triton_memory.py`",
            "- MiB the allocator holds at its peak above the inputs and the output's gradient (what "
            "gpu_check.py's 'ours peak' measures on a GPU); fp16 and bf16 allocate alike",
            "",
            "| shape (N, C, H, W, s) | fp32 | fp16/bf16 | fp32 deterministic | fp16/bf16 deterministic |",
            "|---|---|---|---|---|",
        ]
        for shape in GPU_SHAPES:
            cells = [
                f"{forward_backward_peak_mib(shape, dtype, deterministic):.1f}"
                for deterministic in (False, True)
                for dtype in (torch.float32, torch.float16)
            ]
            dims = (shape.batch, shape.channels, shape.height, shape.width, shape.stride)
            lines.append(f"| {shape.name} {dims} | " + " | ".join(cells) + " |")
    finally:
        _launch.launch, triton_deform_conv.launch = saved_launch, saved_module_launch
    text = "\n".join(lines) + "\n"
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
