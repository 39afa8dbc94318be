"""Where the host (Python) time of one deform_conv2d call goes, on a GPU.

At the anchor shapes a deformable convolution's kernels take tens of microseconds, so the GPU waits
on the host: the time per call is the Python and launch overhead. This script calibrates what one
PyTorch op and one convolution cost on this host, times the public op's forward and forward+backward
and the backend functions alone without waiting for the GPU, and profiles forward+backward with
cProfile (top functions by own time).

    python benchmarks/profile_host.py                 # CUDA, det-c4 (2x256x50x84), fp16
    python benchmarks/profile_host.py --out FILE.txt  # also write the report there
    python benchmarks/profile_host.py --stub-launches # CPU: our Python overhead alone

``--stub-launches`` runs the Triton backend's host code on tiny CPU tensors with every kernel launch
replaced by a no-op: what remains is the Python and tensor-bookkeeping time this package adds per call
(the part that code changes here can shrink without a GPU to measure on), beside a convolution's.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # must precede any Triton import
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from deformable.benchmark import publish  # noqa: E402
from deformable.ops import deform_conv2d  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize(device)


def host_us(fn, device: str, calls: int = 200, repeats: int = 1) -> float:
    """Microseconds of host time per call (the GPU is not waited for inside the loop); the best of
    ``repeats`` loops of ``calls`` calls."""
    for _ in range(10):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
        sync(device)
    return best / calls * 1e6


def idle_host_us(fn, device: str, calls: int = 200) -> float:
    """Median microseconds of host time of one call made with the GPU idle (synchronised before each):
    unlike back-to-back calls, never throttled by a full launch queue when the GPU is the slower side.
    Assumes ``fn`` has run before (compiled, cached)."""
    times = []
    for _ in range(calls):
        sync(device)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    sync(device)
    return sorted(times)[len(times) // 2] * 1e6


class _NoOpKernel:
    """Stands in for a compiled Triton kernel: ``kernel[grid](*args)`` and its launcher
    ``kernel.run(...)`` (which repeated planned launches call) do nothing."""

    function = 0
    packed_metadata = ()

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args) -> None:
        return None

    @staticmethod
    def run(*args) -> None:
        return None


def stub_launches(tdc) -> None:
    """Let the Triton backend accept CPU tensors and make every kernel launch a no-op at the last
    step: each launch still goes through ``_launch.launch`` (its key, cache lookup and argument list,
    as a repeated launch on a GPU does) and stops where the compiled kernel's launcher would be
    called. The layout copies take the tiled-transpose path a CUDA tensor takes."""
    from deformable.ops import _backend
    from deformable.ops._triton import _launch, _relayout

    _backend.triton_unavailable_reason = lambda device: None
    _relayout._use_kernel = lambda t: True
    _launch.ENABLED = True
    _launch._cuda_device = lambda first: 0 if isinstance(first, torch.Tensor) else None
    _launch._launch_within_resources = lambda *args, **kwargs: _NoOpKernel()
    _launch._runner_calls_run = lambda cls: True
    _launch._current_stream = lambda device: 0

    def binder_agrees(kernel, device, args, constexprs, num_warps, num_stages) -> bool:
        _launch._tails[id(kernel)] = _launch._tail_spec(kernel, len(args))
        return True

    _launch._binder_agrees = binder_agrees


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter)")
    parser.add_argument("--stub-launches", action="store_true", help="CPU, kernel launches stubbed out")
    args = parser.parse_args()
    device, dtype, (n, c, h, w) = "cuda", torch.float16, (2, 256, 50, 84)
    if args.smoke:
        device, dtype, (n, c, h, w) = "cpu", torch.float32, (1, 4, 5, 6)
    from deformable.ops._triton import deform_conv as tdc

    calls = 200 if not args.smoke else 2
    if args.stub_launches:
        device, dtype, (n, c, h, w), calls = "cpu", torch.float32, (1, 16, 6, 6), 1000
        stub_launches(tdc)

    x = torch.randn(n, c, h, w, device=device, dtype=dtype)
    offset = torch.randn(n, 18, h, w, device=device, dtype=dtype) * 2
    mask = torch.rand(n, 9, h, w, device=device, dtype=dtype)
    weight = torch.randn(c, c, 3, 3, device=device, dtype=dtype) * 0.02
    bias = torch.randn(c, device=device, dtype=dtype)
    grad_out = torch.randn(n, c, h, w, device=device, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask, weight, bias)]
    conv_leaves = [leaves[0], leaves[3], leaves[4]]
    geometry = ((1, 1), (1, 1), (1, 1))

    backend = "triton"

    def ours_fwd():
        with torch.no_grad():
            return deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask, backend=backend)

    def ours_fb():
        out = deform_conv2d(leaves[0], leaves[1], leaves[3], leaves[4], 1, 1, 1, leaves[2], backend=backend)
        return torch.autograd.grad(out, leaves, grad_out)

    def conv_fb():
        out = F.conv2d(conv_leaves[0], conv_leaves[1], conv_leaves[2], 1, 1)
        return torch.autograd.grad(out, conv_leaves, grad_out)

    rows = {
        "one small PyTorch op (bias.add_(0))": lambda: bias.add_(0),
        "torch.empty": lambda: torch.empty(100, device=device),
        "F.conv2d forward": lambda: F.conv2d(x, weight, bias, 1, 1),
        "F.conv2d forward+backward": conv_fb,
        "ours forward (public op)": ours_fwd,
        "ours forward (tdc.forward alone)": lambda: tdc.forward(x, offset, mask, weight, bias, *geometry),
        "ours backward (tdc.backward alone)": lambda: tdc.backward(
            grad_out, x, offset, mask, weight, *geometry, (True,) * 5
        ),
        "ours forward+backward (public op, autograd)": ours_fb,
    }
    if args.stub_launches:
        name = f"{platform.processor() or platform.machine()} CPU, Triton launches stubbed out"
    elif device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = "CPU (smoke: measures nothing)"
    lines = [f"# Host time per call on {name} (torch {torch.__version__}), {dtype}, {(n, c, h, w)}", ""]
    if args.stub_launches:
        torch.set_num_threads(1)
        lines += [
            f"{time.strftime('%Y-%m-%d')}; Python {platform.python_version()}; 1 thread; "
            "best of 7 x 1000 calls",
            "",
        ]
    if args.stub_launches:
        lines += ["| call | host us |", "|---|---|"]
    else:
        lines += [
            "host us = back-to-back calls (a full launch queue throttles them to the GPU's pace when the",
            "GPU is the slower side); idle = one call made with the GPU idle (median): its own host cost.",
            "",
            "| call | host us | host us, GPU idle before each call |",
            "|---|---|---|",
        ]
    for row, fn in rows.items():
        cells = [f"{host_us(fn, device, calls, 7 if args.stub_launches else 1):.1f}"]
        if not args.stub_launches:
            cells.append(f"{idle_host_us(fn, device, calls):.1f}")
        lines.append(f"| {row} | {' | '.join(cells)} |")
        print(lines[-1], flush=True)
    if args.stub_launches:
        publish("\n".join(lines) + "\n", args.out)
        return 0
    # The same calls through Triton's own dispatcher: what the direct launches save.
    from deformable.ops._triton import _launch

    _launch.ENABLED = False
    try:
        for row in ("ours forward (tdc.forward alone)", "ours forward+backward (public op, autograd)"):
            us = host_us(rows[row], device, calls)
            idle = idle_host_us(rows[row], device, calls)
            lines.append(f"| {row}, through JITFunction (fast launch off) | {us:.1f} | {idle:.1f} |")
            print(lines[-1], flush=True)
    finally:
        _launch.ENABLED = True

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200 if not args.smoke else 5):
        ours_fb()
    profiler.disable()
    sync(device)
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(35)
    lines += [
        "",
        "## cProfile of 200 forward+backward calls (by own time)",
        "",
        "```",
        stream.getvalue(),
        "```",
    ]
    text = "\n".join(lines) + "\n"
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
