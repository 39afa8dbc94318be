"""One GPU run that checks and measures the Triton deform_conv2d kernels (issue 8).

    python benchmarks/gpu_check.py                  # everything, under 6 minutes on an H100
    python benchmarks/gpu_check.py --out "$OUT"     # write the table there too (device machine)
    python benchmarks/gpu_check.py --smoke          # the same logic on CPU through Triton's interpreter,
                                                    # tiny shapes: checks this script, measures nothing

1. Correctness at real sizes, every output and gradient, fp32 (TF32 off and on), fp16, bf16, against
   torchvision's op in float64 on the GPU (exact, the contract's semantics) on the same rounded
   inputs. Each error is reported in units of the dtype's epsilon times its scale (the sum of |terms|
   from the same op on absolute values; the largest |gradient| for the offset), so 1 is one rounding;
   the pass limits are 4 (outputs) and 8 (gradients), 32 and 64 for full fp32 (or within 1.5x the
   error of torchvision's fp32 op, measured beside it: both round positions to fp32). Also: the deterministic
   mode is bitwise repeatable, fp32 parity with torchvision's fp32 op, autocast, channels_last
   inputs, NaN/inf offsets, batch 0.
2. Timing and peak memory, the seven anchor shapes (shared/anchors) x fp32/fp16/bf16: ours (the
   public op, backend="triton") against cuDNN conv2d (the faster of NCHW and channels_last) and
   torchvision's deform_conv2d, forward and forward+backward (triton.testing.do_bench medians, cold
   L2), plus our backward's two halves and the deterministic mode. fp32 runs with PyTorch's default
   TF32 setting for convolutions, which both cuDNN and our kernels follow.
3. Where our kernels' time goes (fp16, four shapes; run before the timing table): each kernel
   alone, the data-gradient kernel also split into its input-gradient scatter (fp32 atomics) and its
   offset/mask gathers, and the input gradient of deterministic mode (sort, cell sums, gather).
4. With time left: a configuration sweep of the forward, data and weight kernels at the shapes and
   dtypes the last sweeps left open (or --sweep-plan's), to retune the heuristics in
   src/deformable/ops/_triton/deform_conv.py.

A time budget (--budget, seconds) skips whatever would not fit; the table says what was skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import math
import os
import platform
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if "--smoke" in sys.argv:  # must precede any Triton import
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torchvision  # noqa: E402

from deformable.benchmark import deterministic_algorithms  # noqa: E402
from deformable.ops import deform_conv2d  # noqa: E402
from deformable.ops._triton import _launch as tdc_launch  # noqa: E402
from deformable.ops._triton import _relayout  # noqa: E402
from deformable.ops._triton import deform_conv as tdc  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TF32_EPS = 2.0**-10
LIMITS = {"out": 4.0, "grad": 8.0}
FP32_LIMITS = {"out": 32.0, "grad": 64.0}
GRAD_NAMES = ("input", "offset", "mask", "weight", "bias")


# --------------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class Problem:
    name: str
    batch: int
    in_channels: int
    out_channels: int
    size: tuple[int, int]
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    offset_groups: int = 1
    mask: bool = True
    bias: bool = True
    offset_std: float = 2.0

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple(
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(
                self.size, self.padding, self.dilation, self.kernel, self.stride, strict=True
            )
        )

    def tensors(self, dtype: torch.dtype, device, seed: int = 0):
        """(input, offset, mask, weight, bias): randn input, offsets N(0, std^2), mask U(0, 1)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        kh, kw = self.kernel
        oh, ow = self.out_size
        taps = self.offset_groups * kh * kw

        def rand(*shape, scale=1.0, uniform=False):
            t = torch.rand(*shape, generator=g) if uniform else torch.randn(*shape, generator=g)
            return (t * scale).to(dtype).to(device)

        fan_in = self.in_channels // self.groups * kh * kw
        offset = rand(self.batch, 2 * taps, oh, ow, scale=self.offset_std)
        # Rounded to fp16/bf16, many offsets are integers, and a sample exactly on the line y = -1 or
        # x = -1 is outside (value 0, offset gradient 0) where torchvision's offset gradient is not 0.
        offset = torch.where(offset == offset.floor(), offset + 0.25, offset)
        return (
            rand(self.batch, self.in_channels, *self.size),
            offset,
            rand(self.batch, taps, oh, ow, uniform=True) if self.mask else None,
            rand(self.out_channels, self.in_channels // self.groups, kh, kw, scale=fan_in**-0.5),
            rand(self.out_channels, scale=0.1) if self.bias else None,
        )

    def call(self, fn, tensors):
        x, offset, mask, weight, bias = tensors
        return fn(x, offset, weight, bias, self.stride, self.padding, self.dilation, mask)


def anchors(smoke: bool) -> list[Problem]:
    """The seven 3x3 convs of shared/anchors (ResNet-50 conv3-conv5, detector and classifier size)."""
    rows = [
        ("det-c3", 2, 128, (100, 168), 1), ("det-c4", 2, 256, (50, 84), 1),
        ("det-c5", 2, 512, (25, 42), 1), ("det-c4-s2", 2, 256, (100, 168), 2),
        ("cls-c3", 64, 128, (28, 28), 1), ("cls-c4", 64, 256, (14, 14), 1), ("cls-c5", 64, 512, (7, 7), 1),
    ]  # fmt: skip
    if smoke:
        rows = [(name, 1, 16, (6, 7), s) for name, _, _, _, s in rows[:2]]
    return [Problem(name, n, c, c, size, stride=(s, s)) for name, n, c, size, s in rows]


def correctness_problems(smoke: bool) -> list[Problem]:
    if smoke:
        return [
            Problem("tiny", 1, 16, 16, (6, 7)),
            Problem(
                "tiny-groups", 1, 6, 4, (5, 6), groups=2, offset_groups=3, dilation=(2, 1), padding=(2, 1)
            ),
        ]
    return [
        Problem("det-c4", 2, 256, 256, (50, 84)),
        Problem("det-c4-s2 (batch 1)", 1, 256, 256, (100, 168), stride=(2, 2)),
        Problem("cls-c5 (batch 16)", 16, 512, 512, (7, 7)),
        # Offset groups (3, 64 channels each) straddle the weight groups (2, 96 channels each).
        Problem(
            "groups2-og3-dil2", 2, 192, 128, (40, 60), padding=(2, 2), dilation=(2, 2), groups=2,
            offset_groups=3,
        ),
        Problem(
            "dcnv1-5x5-no-bias", 2, 64, 96, (48, 64), kernel=(5, 5), padding=(2, 2), mask=False, bias=False
        ),
        # Channel counts off the 16-grid, a non-square kernel, mixed stride and dilation, odd sizes.
        Problem(
            "odd-72to40-k32", 3, 72, 40, (37, 29), kernel=(3, 2), stride=(2, 1), padding=(1, 0),
            dilation=(1, 2), offset_groups=2,
        ),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Helpers


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def add(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


class Clock:
    def __init__(self, budget: float):
        self.start = time.perf_counter()
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn: Callable[[], object], device) -> float:
    """Median milliseconds of fn (do_bench on CUDA; a few plain timings under --smoke)."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    fn()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def host_ms(fn: Callable[[], object], device, calls: int = 30) -> float:
    """Milliseconds of host (Python + launch) time per call: the calls are timed without waiting for
    the GPU, so when this is close to bench_ms the GPU waits on the host (launch-bound)."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    sync(device)
    return elapsed / calls * 1e3


def graph_ms(fn: Callable[[], object], device) -> float:
    """Median milliseconds of fn captured in a CUDA graph and replayed: the GPU time alone, with no
    Python or launch cost (what torch.compile(mode="reduce-overhead") or CUDA graphs give a user).
    NaN off CUDA, or if capture fails (the failure is printed)."""
    if torch.device(device).type != "cuda":
        return math.nan
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: compilation, allocator, autotuning
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench_ms(graph.replay, device)
    except Exception:
        traceback.print_exc()
        return math.nan


def kernel_ms(fn: Callable[[], object], device) -> float:
    """Milliseconds of the GPU work of fn: its CUDA graph's replay (:func:`graph_ms`), or do_bench where
    capture fails. For the sweep and the breakdown, whose calls of tens of microseconds the host would
    otherwise time: at det-c4 the eager sweep of 2026-11-28 ranked the fp16 forward's flat loop 15%
    faster (0.095 against 0.112 ms, both host time), where in a graph it was 27% slower (0.092 against
    0.072)."""
    ms = graph_ms(fn, device)
    return ms if math.isfinite(ms) else bench_ms(fn, device)


def peak_mib(fn: Callable[[], object], device) -> float:
    """Peak memory allocated while fn runs, above what was allocated before (MiB); NaN off CUDA."""
    if torch.device(device).type != "cuda":
        fn()
        return math.nan
    sync(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@contextlib.contextmanager
def tf32(enabled: bool):
    """cuDNN's TF32 switch for convolutions, which our fp32 kernels follow too."""
    with torch.backends.cudnn.flags(allow_tf32=enabled):
        yield


def fwd_bwd(problem: Problem, fn, tensors, grad_output):
    """Closure: forward + backward through autograd, returning the gradients of every tensor given."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
    wanted = [t for t in leaves if t is not None]

    def run():
        out = problem.call(fn, leaves)
        return torch.autograd.grad(out, wanted, grad_output)

    return run


def ours(x, offset, weight, bias, stride, padding, dilation, mask):
    return deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask, backend="triton")


def torchvision_op(x, offset, weight, bias, stride, padding, dilation, mask):
    return torchvision.ops.deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)


def conv(x, weight, bias, stride, padding):
    return F.conv2d(x, weight, bias, stride, padding)


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}"


# --------------------------------------------------------------------------------------------------
# 1. Correctness


def reference(problem: Problem, tensors, grad_output, absolute: bool):
    """torchvision's op in float64 on the same device: output and the five gradients (None if absent).

    With ``absolute``, every tensor but the offset (and grad_output) is replaced by its absolute value:
    the results then bound the sum of |terms| of the output and of the input, mask, weight and bias
    gradients (bilinear weights are non-negative).
    """
    leaves = []
    for i, t in enumerate(tensors):
        if t is None:
            leaves.append(None)
            continue
        t = t.detach().double()
        leaves.append((t.abs() if absolute and i != 1 else t).requires_grad_())
    go = grad_output.double().abs() if absolute else grad_output.double()
    out = problem.call(torchvision_op, leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], go)
    it = iter(grads)
    return out.detach(), [None if t is None else next(it) for t in leaves]


def scaled_error(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | float, eps: float) -> float:
    """max |got - ref| / (eps * scale): the error in roundings of the terms' scale."""
    err = (got.double() - ref).abs()
    return ((err / (eps * scale + 1e-300)).max().item()) if err.numel() else 0.0


def _scaled_errors(problem: Problem, fn, tensors, grad_output, refs, eps: float) -> dict[str, float]:
    """Errors of ``fn``'s output and gradients against the float64 reference, in eps x scale."""
    out = problem.call(fn, tensors)
    grads = iter(fwd_bwd(problem, fn, tensors, grad_output)())
    grads = [None if t is None else next(grads) for t in tensors]
    (ref_out, ref_grads), (abs_out, abs_grads) = refs
    errors = {"out": scaled_error(out, ref_out, abs_out, eps)}
    for name, g, r, b in zip(GRAD_NAMES, grads, ref_grads, abs_grads, strict=True):
        if g is None:
            continue
        scale = (r if name == "offset" else b).abs().max().item()
        errors[name] = scaled_error(g, r, scale, eps)
    return errors


# Full fp32 may also pass by being as accurate as torchvision's fp32 op: both round the sampling
# positions to fp32, whose error grows with the coordinates (a 168-pixel-wide map loses ~8 bits of
# the fraction), and the offset gradient's scale is its largest value, not a sum of |terms|.
TORCHVISION_FACTOR = 1.5


def check_problem(problem: Problem, mode: str, device, report: Report) -> None:
    """Output and gradients of ours in ``mode`` (fp32-ieee, fp32-tf32, fp16, bf16) against float64;
    in fp32-ieee also torchvision's fp32 op, as the yardstick of what fp32 positions allow."""
    dtype = torch.float32 if mode.startswith("fp32") else DTYPES[mode]
    eps = TF32_EPS if mode == "fp32-tf32" else torch.finfo(dtype).eps
    limits = FP32_LIMITS if mode == "fp32-ieee" else LIMITS
    tensors = problem.tensors(dtype, device)
    out_shape = problem.call(ours, tensors).shape
    grad_output = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    refs = (
        reference(problem, tensors, grad_output, absolute=False),
        reference(problem, tensors, grad_output, absolute=True),
    )
    with tf32(mode == "fp32-tf32"):
        errors = _scaled_errors(problem, ours, tensors, grad_output, refs, eps)
    tv_errors = None
    if mode == "fp32-ieee":
        with tf32(False):  # torchvision's GEMMs follow the matmul switch, off by default: full fp32
            tv_errors = _scaled_errors(problem, torchvision_op, tensors, grad_output, refs, eps)

    def passes(key: str, value: float) -> bool:
        if value <= limits["out" if key == "out" else "grad"]:
            return True
        return tv_errors is not None and value <= TORCHVISION_FACTOR * tv_errors.get(key, 0.0)

    bad = [k for k, v in errors.items() if not passes(k, v)]
    status = "ok" if not bad else "FAIL " + ",".join(bad)
    if bad:
        report.failures.append(f"{problem.name} {mode}: {bad}")
    cells = " | ".join(fmt(errors.get(k), 2) for k in ("out", *GRAD_NAMES))
    report.add(f"| {problem.name} | {mode} | {cells} | {status} |")
    if tv_errors is not None:
        cells = " | ".join(fmt(tv_errors.get(k), 2) for k in ("out", *GRAD_NAMES))
        report.add(f"| {problem.name} | fp32 torchvision | {cells} | yardstick |")


def check_deterministic(problem: Problem, dtype: torch.dtype, device, report: Report) -> None:
    tensors = problem.tensors(dtype, device)
    grad_output = torch.randn(problem.call(ours, tensors).shape, device=device).to(dtype)
    run = fwd_bwd(problem, ours, tensors, grad_output)
    with deterministic_algorithms(True):
        first, second = run(), run()
    atomic = run()
    repeatable = all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    diff = (first[0].double() - atomic[0].double()).abs().max().item() / (atomic[0].abs().max().item() or 1.0)
    ok = repeatable and diff < 64 * torch.finfo(dtype).eps
    if not ok:
        report.failures.append(f"deterministic {problem.name} {dtype}")
    report.add(
        f"- deterministic mode, {problem.name} {str(dtype)[6:]}: bitwise repeatable: {repeatable}; "
        f"grad_input vs the atomic path: max diff {diff:.2g} of max |grad|: {'ok' if ok else 'FAIL'}"
    )


def check_roi_pool(device, report: Report, smoke: bool) -> None:
    """deform_roi_pool on the GPU (the ATen path) against the reference implementation on the CPU."""
    from deformable.ops import deform_roi_pool

    gen = torch.Generator().manual_seed(0)
    n, c, h, w, k = (1, 4, 6, 7, 5) if smoke else (2, 64, 50, 76, 128)
    scale = 1 / 16
    feat = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    xy = torch.rand(k, 2, generator=gen, dtype=torch.float64) * torch.tensor([w, h]) / scale
    wh = torch.rand(k, 2, generator=gen, dtype=torch.float64) * 300 + 4
    rois = torch.cat([torch.randint(0, n, (k, 1), generator=gen).double(), xy - wh / 2, xy + wh / 2], 1)
    offset = torch.randn(k, 2, 7, 7, generator=gen, dtype=torch.float64) * 0.5
    mask = torch.rand(k, 1, 7, 7, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(k, c, 7, 7, generator=gen, dtype=torch.float64)

    def run(dtype, dev, backend):
        leaves = [t.to(dev, dtype).requires_grad_() for t in (feat, offset, mask)]
        out = deform_roi_pool(
            leaves[0], rois.to(dev, dtype), leaves[1], leaves[2], 7, scale, 2, 0.1, aligned,
            backend=backend,
        )  # fmt: skip
        grads = torch.autograd.grad(out, leaves, grad_out.to(dev, dtype))
        return [t.double().cpu() for t in (out, *grads)]

    backends = (None, "aten") if torch.device(device).type == "cuda" else (None,)
    references: dict[bool, list[torch.Tensor]] = {}
    for aligned, backend, (dtype, limit) in itertools.product(
        (False, True), backends, ((torch.float64, 1e-10), (torch.float32, 1e-4))
    ):
        if aligned not in references:
            references[aligned] = run(torch.float64, "cpu", "reference")
        want = references[aligned]
        got = run(dtype, device, backend)
        errors = [
            ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
            for g, r in zip(got, want, strict=True)
        ]
        ok = max(errors) < limit
        listed = ", ".join(f"{e:.1g}" for e in errors)
        report.add(
            f"- deform_roi_pool {str(dtype)[6:]} aligned={aligned} backend={backend or 'auto'} on {device} "
            "vs the CPU reference: "
            f"max relative error out / grad input / offset / mask {listed}: " + ("ok" if ok else "FAIL")
        )
        if not ok:
            report.failures.append(f"deform_roi_pool {dtype} aligned={aligned}")


def check_misc(device, report: Report, smoke: bool) -> None:
    """torchvision fp32 parity, autocast, channels_last, NaN/inf offsets, batch 0."""
    problem = correctness_problems(smoke)[0]
    tensors = problem.tensors(torch.float32, device)
    with tf32(False):
        a = problem.call(ours, tensors)
        b = problem.call(torchvision_op, tensors)
    rel = ((a - b).abs().max() / b.abs().max()).item()
    ok = rel < 1e-5
    verdict = "ok" if ok else "FAIL"
    report.add(f"- fp32 (TF32 off) vs torchvision's fp32 op: max diff {rel:.2g} of max |out|: {verdict}")
    if not ok:
        report.failures.append("torchvision fp32 parity")

    if torch.device(device).type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            auto = problem.call(ours, tensors)
        direct = problem.call(ours, [None if t is None else t.bfloat16() for t in tensors])
        ok = auto.dtype == torch.bfloat16 and torch.equal(auto, direct)
        report.add(
            f"- autocast(bf16) on fp32 tensors: runs in bf16, equals the bf16 call: {'ok' if ok else 'FAIL'}"
        )
        if not ok:
            report.failures.append("autocast")

    x, offset, mask, weight, bias = tensors
    strided = (
        x.to(memory_format=torch.channels_last),
        offset.transpose(2, 3).contiguous().transpose(2, 3),
        mask,
    )
    same = torch.equal(problem.call(ours, (*strided, weight, bias)), problem.call(ours, tensors))
    report.add(f"- channels_last / transposed inputs give identical outputs: {'ok' if same else 'FAIL'}")
    if not same:
        report.failures.append("non-contiguous inputs")

    edge = offset.clone()
    edge[0, 0, 0, 0] = math.inf
    edge[0, 1, 1, 1] = -math.inf
    edge[0, 2, 2, 2] = 1e30
    far = edge.clamp(-1e4, 1e4)
    edge[0, 3, 3, 3] = math.nan  # tap 1's dx at pixel (3, 3)
    far[0, 3, 3, 3] = 0.0
    got = problem.call(ours, (x, edge, mask, weight, bias))
    want = problem.call(ours, (x, far, mask, weight, bias))
    nan_at = got.isnan().any(dim=1)
    expected = torch.zeros_like(nan_at)
    expected[0, 3, 3] = True
    ok = torch.equal(nan_at, expected) and torch.equal(got[~got.isnan()], want[~got.isnan()])
    verdict = "ok" if ok else "FAIL"
    report.add(f"- inf / huge offsets are just outside, a NaN offset poisons only its pixel: {verdict}")
    if not ok:
        report.failures.append("NaN/inf offsets")

    empty = Problem("batch0", 0, 16, 16, (6, 7)).tensors(torch.float32, device)
    out = Problem("batch0", 0, 16, 16, (6, 7)).call(ours, empty)
    report.add(f"- batch 0: output shape {tuple(out.shape)}: {'ok' if out.shape[0] == 0 else 'FAIL'}")


def correctness(device, report: Report, clock: Clock, smoke: bool, only: list[str] | None = None) -> None:
    report.add("## Correctness")
    report.add("")
    report.add(
        "Errors in units of eps x scale (scale: sum of |terms| per output element; per gradient the "
        "largest such sum, the largest |gradient| for the offset); eps of the dtype, 2^-10 for TF32. "
        f"Limits: {LIMITS['out']:g} (out), {LIMITS['grad']:g} (gradients); full fp32 "
        f"{FP32_LIMITS['out']:g} and {FP32_LIMITS['grad']:g}, or within {TORCHVISION_FACTOR:g}x the error "
        "of torchvision's fp32 op (its row, 'fp32 torchvision'), which rounds positions to fp32 as we do."
    )
    report.add("")
    report.add("| problem | mode | out | " + " | ".join(f"grad {n}" for n in GRAD_NAMES) + " | |")
    report.add("|---|---|---|---|---|---|---|---|---|")
    problems = [p for p in correctness_problems(smoke) if only is None or p.name.startswith(tuple(only))]
    for problem in problems:
        for mode in ("fp32-ieee", "fp32-tf32", "fp16", "bf16"):
            if clock.left() < 0.6 * clock.budget:
                report.skipped.append(f"correctness {problem.name} {mode}")
                continue
            try:
                check_problem(problem, mode, device, report)
            except Exception as e:
                report.failures.append(f"{problem.name} {mode}: {e!r}")
                report.add(f"| {problem.name} | {mode} | error: {type(e).__name__}: {str(e)[:120]} |")
                traceback.print_exc()
    report.add("")
    for problem, dtype in [
        (correctness_problems(smoke)[0], torch.float16),
        (correctness_problems(smoke)[0], torch.float32),
    ]:
        try:
            check_deterministic(problem, dtype, device, report)
        except Exception as e:
            report.failures.append(f"deterministic: {e!r}")
            traceback.print_exc()
    for check in (check_misc, check_roi_pool):
        try:
            check(device, report, smoke)
        except Exception as e:
            report.failures.append(f"{check.__name__}: {e!r}")
            traceback.print_exc()
    report.add("")


# --------------------------------------------------------------------------------------------------
# 2. Timing


def measure(problem: Problem, dtype: torch.dtype, device) -> dict[str, float]:
    """Milliseconds and MiB of every contender on one problem."""
    r: dict[str, float] = {}
    tensors = problem.tensors(dtype, device)
    x, offset, mask, weight, bias = tensors
    grad_output = torch.randn(problem.call(ours, tensors).shape, device=device).to(dtype)

    conv_fwd, conv_fb, conv_peak, conv_trains, conv_forwards = [], [], [], [], []
    for fmt_ in (torch.contiguous_format, torch.channels_last):
        xc, wc, go = (t.to(memory_format=fmt_) for t in (x, weight, grad_output))
        conv_forwards.append(lambda xc=xc, wc=wc: conv(xc, wc, bias, problem.stride, problem.padding))
        conv_fwd.append(bench_ms(conv_forwards[-1], device))
        leaves = [t.detach().requires_grad_() for t in (xc, wc, bias)]

        def conv_train(leaves=leaves, go=go):
            out = conv(leaves[0], leaves[1], leaves[2], problem.stride, problem.padding)
            return torch.autograd.grad(out, leaves, go)

        conv_fb.append(bench_ms(conv_train, device))
        conv_peak.append(peak_mib(conv_train, device))
        conv_trains.append(conv_train)
    best = min(range(2), key=lambda i: conv_fb[i])
    r["conv_fwd"], r["conv_fb"], r["conv_peak"] = min(conv_fwd), min(conv_fb), conv_peak[best]
    r["conv_graph_fb"] = graph_ms(conv_trains[best], device)
    r["conv_graph_fwd"] = graph_ms(conv_forwards[min(range(2), key=lambda i: conv_fwd[i])], device)

    r["ours_fwd"] = bench_ms(lambda: problem.call(ours, tensors), device)
    train = fwd_bwd(problem, ours, tensors, grad_output)
    r["ours_fb"] = bench_ms(train, device)
    # A channels_last model's tensors: no channels-last copy of the input, none of grad_output.
    cl = tuple(
        t.to(memory_format=torch.channels_last) if t is not None and t.dim() == 4 else t for t in tensors
    )
    grad_cl = grad_output.to(memory_format=torch.channels_last)
    r["ours_cl_fwd"] = bench_ms(lambda: problem.call(ours, cl), device)
    r["ours_cl_fb"] = bench_ms(fwd_bwd(problem, ours, cl, grad_cl), device)
    # In a graph too: eagerly both layouts wait on the host, which hides what the copies cost.
    r["ours_cl_graph_fb"] = graph_ms(fwd_bwd(problem, ours, cl, grad_cl), device)
    r["ours_host_fb"] = host_ms(train, device)
    r["ours_graph_fb"] = graph_ms(train, device)
    r["ours_graph_fwd"] = graph_ms(lambda: problem.call(ours, tensors), device)
    r["conv_host_fb"] = host_ms(conv_trains[best], device)
    r["ours_peak"] = peak_mib(train, device)
    geometry = (problem.stride, problem.padding, problem.dilation)
    r["ours_bwd_data"] = bench_ms(
        lambda: tdc.backward(
            grad_output, x, offset, mask, weight, *geometry, (True, True, True, False, False)
        ),
        device,
    )
    r["ours_bwd_weight"] = bench_ms(
        lambda: tdc.backward(
            grad_output, x, offset, mask, weight, *geometry, (False, False, False, True, True)
        ),
        device,
    )
    with deterministic_algorithms(True):
        r["ours_det_fb"] = bench_ms(train, device)

    if dtype == torch.bfloat16:  # torchvision has no bf16 kernels
        r["tv_fwd"] = r["tv_fb"] = r["tv_peak"] = math.nan
    else:
        r["tv_fwd"] = bench_ms(lambda: problem.call(torchvision_op, tensors), device)
        tv_train = fwd_bwd(problem, torchvision_op, tensors, grad_output)
        r["tv_fb"] = bench_ms(tv_train, device)
        r["tv_peak"] = peak_mib(tv_train, device)
    return r


def timing(
    device, report: Report, clock: Clock, smoke: bool, only: list[str] | None = None
) -> list[tuple[str, str, dict]]:
    """Time every anchor shape (or those named in ``only``) in every dtype."""
    rows = []
    problems = anchors(smoke)
    if only is not None:
        unknown = sorted(set(only) - {p.name for p in problems})
        if unknown:
            known = [p.name for p in problems]
            raise ValueError(f"--timing-shapes: unknown shapes {unknown}; known: {known}")
        problems = [p for p in problems if p.name in only]
    # Shapes outermost: if time runs short, the rows that are left out are whole shapes, not a dtype.
    for problem in problems:
        for dtype_name, dtype in DTYPES.items():
            if clock.left() < 0.08 * clock.budget:
                report.skipped.append(f"timing {problem.name} {dtype_name}")
                continue
            try:
                r = measure(problem, dtype, device)
            except Exception as e:
                report.failures.append(f"timing {problem.name} {dtype_name}: {e!r}")
                traceback.print_exc()
                continue
            rows.append((problem.name, dtype_name, r))
            print(
                f"  {problem.name} {dtype_name}: " + ", ".join(f"{k}={v:.4g}" for k, v in r.items()),
                flush=True,
            )
    return rows


def timing_tables(rows, report: Report) -> None:
    def ratio(r, a, b):
        return r[a] / r[b] if r[b] and not math.isnan(r[a]) else math.nan

    report.add("## Speed and memory")
    report.add("")
    report.add(
        "Median ms (triton.testing.do_bench). conv = cuDNN F.conv2d, the faster of NCHW and channels_last; "
        "tv = torchvision.ops.deform_conv2d; ours = deform_conv2d(backend='triton') with a mask "
        "(offsets ~ N(0, 2^2) px); fwd+bwd = all gradients via torch.autograd.grad; peak = MiB allocated "
        "during fwd+bwd above the inputs. fp32 uses PyTorch's default TF32 setting for convolutions "
        "(on), which both cuDNN and ours follow (torchvision's GEMMs follow the matmul switch: full "
        "fp32). ours det = deterministic mode. Targets: fwd <= 2.0x conv, fwd+bwd <= 3.0x, "
        "peak <= 1.5x, faster than tv."
    )
    report.add("")
    report.add(
        "| shape | dtype | conv fwd | tv fwd | ours fwd | ours/conv fwd | conv f+b | tv f+b | ours f+b | "
        "ours/conv f+b | ours bwd data | ours bwd weight | ours det f+b | conv peak | tv peak | ours peak | "
        "ours/conv peak | targets |"
    )
    report.add("|" + "---|" * 18)
    for name, dtype_name, r in rows:
        f_ratio = ratio(r, "ours_fwd", "conv_fwd")
        fb_ratio = ratio(r, "ours_fb", "conv_fb")
        peak_ratio = ratio(r, "ours_peak", "conv_peak")
        beats_tv = math.isnan(r["tv_fwd"]) or (r["ours_fwd"] < r["tv_fwd"] and r["ours_fb"] < r["tv_fb"])
        met = (
            f_ratio <= 2.0 and fb_ratio <= 3.0 and (math.isnan(peak_ratio) or peak_ratio <= 1.5) and beats_tv
        )
        cells = [
            name, dtype_name, fmt(r["conv_fwd"]), fmt(r["tv_fwd"]), fmt(r["ours_fwd"]), fmt(f_ratio),
            fmt(r["conv_fb"]), fmt(r["tv_fb"]), fmt(r["ours_fb"]), fmt(fb_ratio), fmt(r["ours_bwd_data"]),
            fmt(r["ours_bwd_weight"]), fmt(r["ours_det_fb"]), fmt(r["conv_peak"]), fmt(r["tv_peak"]),
            fmt(r["ours_peak"]), fmt(peak_ratio), "met" if met else "missed",
        ]  # fmt: skip
        report.add("| " + " | ".join(cells) + " |")
    report.add("")
    report.add(
        "Host time per fwd+bwd call (ms, Python + launches, not waiting for the GPU): where it is close "
        "to the f+b time above, the GPU waits on the host and the ratio measures launch overhead. "
        "graph = the same fwd+bwd captured in a CUDA graph and replayed (GPU time alone, what CUDA "
        "graphs or torch.compile(mode='reduce-overhead') give): the kernels' own cost; graph fwd likewise "
        "for the forward alone."
    )
    report.add("")
    report.add(
        "cl = every tensor channels_last (a channels_last model): the op reads them as they are and "
        "returns the output and gradients channels_last, without the input's and grad_output's layout copies."
    )
    report.add("")
    report.add(
        "| shape | dtype | conv host f+b | ours host f+b | ours f+b | conv graph f+b | ours graph f+b | "
        "ours/conv graph f+b | ours cl fwd | ours cl f+b | ours cl/conv fwd | ours cl/conv f+b | "
        "ours cl graph f+b | ours cl/NCHW graph f+b | conv graph fwd | ours graph fwd | ours/conv graph fwd |"
    )
    report.add("|" + "---|" * 17)
    for name, dtype_name, r in rows:
        cells = [
            name, dtype_name, fmt(r["conv_host_fb"]), fmt(r["ours_host_fb"]), fmt(r["ours_fb"]),
            fmt(r["conv_graph_fb"]), fmt(r["ours_graph_fb"]), fmt(ratio(r, "ours_graph_fb", "conv_graph_fb")),
            fmt(r["ours_cl_fwd"]), fmt(r["ours_cl_fb"]), fmt(ratio(r, "ours_cl_fwd", "conv_fwd")),
            fmt(ratio(r, "ours_cl_fb", "conv_fb")), fmt(r["ours_cl_graph_fb"]),
            fmt(ratio(r, "ours_cl_graph_fb", "ours_graph_fb")), fmt(r["conv_graph_fwd"]),
            fmt(r["ours_graph_fwd"]), fmt(ratio(r, "ours_graph_fwd", "conv_graph_fwd")),
        ]  # fmt: skip
        report.add("| " + " | ".join(cells) + " |")
    report.add("")
    for dtype_name in DTYPES:
        sel = [r for _, d, r in rows if d == dtype_name]
        if not sel:
            continue
        span = []
        for key, base, label in (
            ("ours_fwd", "conv_fwd", "fwd"), ("ours_fb", "conv_fb", "fwd+bwd"),
            ("ours_graph_fwd", "conv_graph_fwd", "fwd in a CUDA graph"),
            ("ours_graph_fb", "conv_graph_fb", "fwd+bwd in a CUDA graph"),
        ):  # fmt: skip
            values = [v for v in (ratio(r, key, base) for r in sel) if not math.isnan(v)]
            if values:
                span.append(f"{label} {min(values):.2f}-{max(values):.2f}x conv")
        report.add(f"- {dtype_name}: ours " + ", ".join(span))
    report.add("")


# --------------------------------------------------------------------------------------------------
# 3. Configuration sweep


def _tensors(result) -> tuple[torch.Tensor, ...]:
    """The tensors of a backend call's result (the forward's output, or the gradients asked for)."""
    items = result if isinstance(result, (tuple, list)) else (result,)
    return tuple(t for t in items if isinstance(t, torch.Tensor))


def _relative_difference(got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> float:
    """max over results of max |got - expected| / max |expected| (inf if the results do not match up)."""
    if len(got) != len(expected) or any(a.shape != b.shape for a, b in zip(got, expected, strict=True)):
        return math.inf
    worst = 0.0
    for a, b in zip(got, expected, strict=True):
        scale = b.double().abs().max().item() or 1.0
        worst = max(worst, (a.double() - b.double()).abs().max().item() / scale)
    return worst


def _kernel_runs(problem: Problem, device, dtype: torch.dtype = torch.float16):
    """(geometry, {kernel name: closure running just that kernel's launch path}, input) in ``dtype``."""
    x, offset, mask, weight, bias = problem.tensors(dtype, device)
    geometry = (problem.stride, problem.padding, problem.dilation)
    out_shape = problem.call(ours, (x, offset, mask, weight, bias)).shape
    grad_output = torch.randn(out_shape, device=device).to(dtype)
    data_only, weight_only = (True, True, True, False, False), (False, False, False, True, False)
    runs = {
        "forward": lambda: tdc.forward(x, offset, mask, weight, bias, *geometry),
        "data": lambda: tdc.backward(grad_output, x, offset, mask, weight, *geometry, data_only),
        "weight": lambda: tdc.backward(grad_output, x, offset, mask, weight, *geometry, weight_only),
        "fused": _backward_run(grad_output, (x, offset, mask, weight), geometry, fused=True),
    }
    return tdc._Geometry.of(x, offset, weight, *geometry), runs, x


@contextlib.contextmanager
def _switched(**values):
    """deform_conv's module switches (``tdc.<name>``) set to ``values`` inside the block."""
    previous = {name: getattr(tdc, name) for name in values}
    for name, value in values.items():
        setattr(tdc, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(tdc, name, value)


def _backward_with(grad_output, tensors, geometry, switch: str, value, needs: tuple) -> Callable[[], object]:
    """Closure: ``tdc.backward`` of the gradients ``needs`` asks for, with the module switch
    ``tdc.<switch>`` set to ``value`` for the call."""
    x, offset, mask, weight = tensors

    def run():
        with _switched(**{switch: value}):
            return tdc.backward(grad_output, x, offset, mask, weight, *geometry, needs)

    return run


def _backward_run(grad_output, tensors, geometry, fused: bool) -> Callable[[], object]:
    """Closure: ``tdc.backward`` of the input, offset, mask and weight gradients, with the data and
    weight kernels fused into one pass or not (``tdc.FUSED_BACKWARD``, set for the call)."""
    return _backward_with(grad_output, tensors, geometry, "FUSED_BACKWARD", fused, (True,) * 4 + (False,))


def fused_ab(device, report: Report, clock: Clock, smoke: bool, only: list[str] | None = None) -> None:
    """The fused backward (one pass for the data and weight gradients) against the two kernels, per
    anchor shape (those named in ``only``, as for the other A/B sections) and dtype where it applies
    (C_out/groups <= 256), in CUDA graphs, with the largest difference of their gradients."""
    problems = [p for p in anchors(smoke) if p.out_channels <= 256 and (only is None or p.name in only)]
    _ab_section(
        device, report, clock, smoke, problems,
        "Fused backward (data + weight in one kernel) against the two kernels",
        "ms: GPU time (CUDA graph replays) of tdc.backward for the input, offset, mask and weight gradients"
        " with each kernel's default configuration; fp32 with TF32. diff: the largest difference of any"
        " gradient, relative to that gradient's largest magnitude.",
        ("two kernels", "fused", "fused / two"),
        _backward_run, reserve=0.5,
    )  # fmt: skip


def _ab_section(
    device, report: Report, clock: Clock, smoke: bool, problems, title: str, text: str,
    columns: tuple[str, str, str], run_with, reserve: float,
) -> None:  # fmt: skip
    """An A/B of a backend backward call with a switch off and on: ``title``'s section, ``text`` and
    per problem (the first only in a smoke run) and dtype (fp32 with TF32) a row:
    ``run_with(grad_output, (x, offset, mask, weight), geometry, on)`` gives the closure for each
    choice, timed in CUDA graphs; ``columns`` name the off ms, the on ms and on / off, then the
    largest difference of their gradients relative to each gradient's largest magnitude. A row is
    skipped (named by the title) once less than ``reserve`` of the budget is left."""
    report.add(f"## {title}")
    report.add("")
    report.add(text)
    report.add("")
    report.add(f"| shape | dtype | {' | '.join(columns)} | diff |")
    report.add("|---|---|---|---|---|---|")
    for problem in problems[:1] if smoke else problems:
        for dtype_name, dtype in DTYPES.items():
            if clock.left() < reserve * clock.budget:
                report.skipped.append(f"{title}: {problem.name} {dtype_name}")
                continue
            try:
                with tf32(True):
                    x, offset, mask, weight, bias = problem.tensors(dtype, device)
                    geometry = (problem.stride, problem.padding, problem.dilation)
                    go = torch.randn(problem.call(ours, (x, offset, mask, weight, bias)).shape, device=device)
                    a, b = (
                        run_with(go.to(dtype), (x, offset, mask, weight), geometry, on)
                        for on in (False, True)
                    )
                    a_ms, b_ms = kernel_ms(a, device), kernel_ms(b, device)
                    diff = _relative_difference(_tensors(b()), _tensors(a()))
                times = f"{fmt(a_ms)} | {fmt(b_ms)} | {fmt(b_ms / a_ms)}"
                report.add(f"| {problem.name} | {dtype_name} | {times} | {diff:.1e} |")
            except Exception as e:
                report.failures.append(f"{title}: {problem.name} {dtype_name}: {e!r}")
    report.add("")


# The forward's opt-in variants (deform_conv module switches), each (BLEND_IN_16_BIT, FLAT_CHANNELS_INNER).
FORWARD_VARIANTS = {
    "default": (False, False),
    "16-bit blend": (True, False),
    "channels inner": (False, True),
    "both": (True, True),
}


def _forward_run(tensors, geometry, switches: tuple[bool, bool]) -> Callable[[], object]:
    """Closure: ``tdc.forward`` with ``tdc.BLEND_IN_16_BIT`` and ``tdc.FLAT_CHANNELS_INNER`` set to
    ``switches`` for the call."""

    def run():
        with _switched(BLEND_IN_16_BIT=switches[0], FLAT_CHANNELS_INNER=switches[1]):
            return tdc.forward(*tensors, *geometry)

    return run


def forward_ab(device, report: Report, clock: Clock, smoke: bool, only: list[str] | None = None) -> None:
    """The forward's opt-in variants against its default, per anchor shape (those named in ``only``,
    as for the timing table), fp16 and bf16 (where both variants act), in CUDA graphs, with each
    one's output error against the float64 reference (in eps x the output's sum of |terms|, as the
    correctness table): the blend of 16-bit neighbours in their own dtype and the flat loop with
    channels fastest (where the default runs the flat loop), and both."""
    report.add("## Forward variants (BLEND_IN_16_BIT, FLAT_CHANNELS_INNER) against the default")
    report.add("")
    report.add(
        "ms: GPU time (CUDA graph replays) of tdc.forward with the default tiles; x: the variant's time"
        " over the default's; err: the largest output error against torchvision's float64 op, in eps x"
        " (sum of |terms|). The channel order changes nothing where the default is not a flat loop:"
        " n/a there."
    )
    report.add("")
    names = list(FORWARD_VARIANTS)
    report.add("| shape | dtype | " + " | ".join(f"{name} ms | err" for name in names) + " |")
    report.add("|---|---|" + "---|---|" * len(names))
    problems = [p for p in anchors(smoke) if only is None or p.name in only]
    for problem in problems[:1] if smoke else problems:
        for dtype_name, dtype in DTYPES.items():
            if dtype == torch.float32:
                continue
            if clock.left() < 0.6 * clock.budget:
                report.skipped.append(f"forward A/B {problem.name} {dtype_name}")
                continue
            try:
                cells = _forward_variant_cells(problem, dtype, device)
                report.add(f"| {problem.name} | {dtype_name} | " + " | ".join(cells) + " |")
            except Exception as e:
                report.failures.append(f"forward A/B {problem.name} {dtype_name}: {e!r}")
    report.add("")


def _forward_variant_cells(problem: Problem, dtype: torch.dtype, device) -> list[str]:
    """The forward A/B row's cells for one shape and dtype: per variant 'ms (x default)' and 'err'."""
    tensors = problem.tensors(dtype, device)
    geometry = (problem.stride, problem.padding, problem.dilation)
    x, offset, mask, weight, bias = tensors
    geo = tdc._Geometry.of(x, offset, weight, *geometry)
    flat = tdc._forward_flat(geo, tdc._default_config("forward", geo, x))
    default = _forward_run((x, offset, mask, weight, bias), geometry, FORWARD_VARIANTS["default"])
    grad_output = torch.zeros(default().shape, device=device, dtype=dtype)
    ref_out, _ = reference(problem, tensors, grad_output, absolute=False)
    abs_out, _ = reference(problem, tensors, grad_output, absolute=True)
    eps = torch.finfo(dtype).eps
    cells, base_ms = [], None
    for blend, inner in FORWARD_VARIANTS.values():
        if inner and not flat:
            cells += ["n/a", "n/a"]
            continue
        run = _forward_run((x, offset, mask, weight, bias), geometry, (blend, inner))
        ms = kernel_ms(run, device)
        base_ms = base_ms or ms
        cells.append(f"{fmt(ms)} ({ms / base_ms:.2f}x)")
        cells.append(f"{scaled_error(run(), ref_out, abs_out, eps):.2g}")
    return cells


def _data_run(grad_output, tensors, geometry, gathered: bool) -> Callable[[], object]:
    """Closure: ``tdc.backward`` of the input, offset and mask gradients (the data kernel) with
    ``tdc.DATA_GATHERED_LAYOUT`` set to ``gathered`` for the call."""
    needs = (True, True, True, False, False)
    return _backward_with(grad_output, tensors, geometry, "DATA_GATHERED_LAYOUT", gathered, needs)


def data_ab(device, report: Report, clock: Clock, smoke: bool, only: list[str] | None = None) -> None:
    """The data kernel with its column gradient out of the matrix unit's layout and its scatter in
    rows of two neighbours (DATA_GATHERED_LAYOUT True) against without (False), per anchor shape (those
    named in ``only``) and dtype, in CUDA graphs."""
    problems = [p for p in anchors(smoke) if only is None or p.name in only]
    _ab_section(
        device, report, clock, smoke, problems,
        "Data kernel: column gradient out of the matrix unit's layout (DATA_GATHERED_LAYOUT)",
        "ms: GPU time (CUDA graph replays) of tdc.backward for the input, offset and mask gradients with"
        " the default configuration; fp32 with TF32. off: DATA_GATHERED_LAYOUT False; on: True. The"
        " default is on in 16-bit and in TF32's 64-pixel, 8-warp tiles (det-c4, det-c5, cls-c4, cls-c5),"
        " off in TF32's 32-pixel tiles (det-c3, cls-c3). diff: the largest difference of any gradient,"
        " relative to its largest magnitude.",
        ("off ms", "on ms", "on / off"),
        _data_run, reserve=0.6,
    )  # fmt: skip


def _breakdown_runs(problem: Problem, device) -> dict[str, Callable[[], object]]:
    """fp16 backend calls (``tdc.forward``/``tdc.backward``: the kernel plus its wrapper's layout
    copies), the data gradient also split by what it computes: grad_input alone (the fp32
    accumulator's zeroing, the kernel's GEMM and atomic scatter, the final conversion) against the
    offset and mask gradients alone (GEMM and gathers), and grad_input alone in deterministic mode
    (the column gradients stored, sorted by cell, summed per cell, gathered per pixel); and the
    wrapper's layout copies (the input into channels-last rows, the fp32 accumulator into an fp16
    NCHW gradient, the weight into the data kernel's layout) by PyTorch's copy and by the tiled
    transpose."""
    x, offset, mask, weight, bias = problem.tensors(torch.float16, device)
    geometry = (problem.stride, problem.padding, problem.dilation)
    go = torch.randn(problem.call(ours, (x, offset, mask, weight, bias)).shape, device=device).half()
    rows = torch.randn(x.permute(0, 2, 3, 1).shape, device=device)  # the data kernel's accumulator
    half, nchw = torch.float16, torch.contiguous_format
    geo = tdc._Geometry.of(x, offset, weight, *geometry)
    c_out, taps = weight.shape[0], weight.shape[2] * weight.shape[3]

    def bwd(output_mask, deterministic=False):
        def run():
            with deterministic_algorithms(deterministic):
                return tdc.backward(go, x, offset, mask, weight, *geometry, output_mask)

        return run

    return {
        "cuDNN conv2d fwd": lambda: conv(x, weight, bias, problem.stride, problem.padding),
        "forward": lambda: tdc.forward(x, offset, mask, weight, bias, *geometry),
        "data: input, offset, mask": bwd((True, True, True, False, False)),
        "data: input only (GEMM + scatter)": bwd((True, False, False, False, False)),
        "data: offset, mask only (GEMM + gathers)": bwd((False, True, True, False, False)),
        "data: input only, deterministic (GEMM + stores, sort, cell sums, gather)": bwd(
            (True, False, False, False, False), deterministic=True
        ),
        "weight": bwd((False, False, False, True, False)),
        # The wrapper's layout copies, PyTorch's strided copy against the tiled transpose now used.
        "layout: input to rows, PyTorch copy": lambda: _relayout.to_rows(x, kernel=False),
        "layout: input to rows, tiled transpose": lambda: _relayout.to_rows(x, kernel=True),
        "layout: fp32 rows to fp16 NCHW, PyTorch copy": lambda: _relayout.from_rows(
            rows, half, nchw, kernel=False
        ),
        "layout: fp32 rows to fp16 NCHW, tiled transpose": lambda: _relayout.from_rows(
            rows, half, nchw, kernel=True
        ),
        # The data kernel's weight: its former layout by PyTorch's copy, its layout now by a transpose.
        "layout: weight, PyTorch copy": lambda: (
            weight.reshape(1, c_out, -1, taps).permute(0, 3, 2, 1).contiguous()
        ),
        "layout: weight, tiled transpose": lambda: tdc._weight_gemm(weight, geo),
    }


def breakdown(device, report: Report, clock: Clock, smoke: bool) -> None:
    """Where our kernels' time goes (fp16): each backend call alone, the data gradient by part."""
    report.add("## Kernel cost breakdown (fp16, ms of GPU time in CUDA graphs; cuDNN conv2d forward beside)")
    report.add("")
    report.add("| shape | part | ms |")
    report.add("|---|---|---|")
    problems = anchors(smoke)
    problems = [*problems[:3], problems[-1]] if not smoke else problems[:1]
    for problem in problems:
        if clock.left() < 0.1 * clock.budget:
            report.skipped.append(f"breakdown {problem.name}")
            continue
        for part, run in _breakdown_runs(problem, device).items():
            try:
                report.add(f"| {problem.name} | {part} | {fmt(kernel_ms(run, device))} |")
            except Exception as e:
                report.failures.append(f"breakdown {problem.name} {part}: {e!r}")
    report.add("")


def sweep(
    device, report: Report, clock: Clock, smoke: bool, only: list[tuple[str, str, str]] | None = None
) -> None:
    """Time a few launch configurations per kernel through CONFIG_OVERRIDES, in CUDA graphs (default
    plan: what the H200 runs of 2026-11-28 left open, most valuable first; --sweep-plan replaces it)."""
    report.add("## Configuration sweep")
    report.add("")
    report.add(
        "ms: GPU time of the backend call (CUDA graph replays). vs default: the largest difference of any"
        " result from the default configuration's, relative to that result's largest magnitude (**differs**"
        " above 2e-2 in 16-bit, 2e-3 in fp32)."
    )
    report.add("")
    config_column = "config (m, n, k, warps, stages[, tap splits][, variant])"
    report.add(f"| shape | dtype | kernel | {config_column} | ms | vs default | |")
    report.add("|---|---|---|---|---|---|---|")
    by_name = {p.name: p for p in anchors(smoke)}
    if smoke:
        plan = [(by_name["det-c3"], torch.float16, ("forward", "data", "weight"))]
    else:
        plan = [
            # The data kernel, the largest cost at every shape, never swept in CUDA graphs (run 8's
            # fused kernel ran fastest with 4 warps where 8 avoided its spills).
            (by_name["det-c3"], torch.float16, ("data",)),
            (by_name["cls-c3"], torch.float16, ("data",)),
            (by_name["det-c4"], torch.float16, ("data",)),
            # Defaults that eager sweeps chose where a kernel takes under ~0.15 ms, so that the host
            # time was timed (run 6 of 2026-11-28: the det-c4 fp16 forward's flat loop ranked 15%
            # faster eagerly, 27% slower in a graph): re-timed in CUDA graphs, most used first.
            (by_name["det-c4"], torch.float16, ("forward", "weight")),
            (by_name["det-c5"], torch.float16, ("forward", "weight")),
            (by_name["cls-c5"], torch.float16, ("forward",)),
            (by_name["det-c4"], torch.bfloat16, ("weight",)),
            (by_name["det-c5"], torch.float32, ("forward",)),
            (by_name["det-c4-s2"], torch.float32, ("forward",)),
            # Open from run 6: the TF32 weight kernel at 128 channels (det-c3 (128, 128, 64, 8, 2)
            # 0.189 against 0.225, cls-c3 the other way), the TF32 data kernel at det-c4-s2 (never
            # swept); from run 8, the fused backward's untimed TF32 default at 256 channels.
            (by_name["det-c3"], torch.float32, ("weight",)),
            (by_name["cls-c3"], torch.float32, ("weight",)),
            (by_name["det-c4-s2"], torch.float32, ("data",)),
            (by_name["det-c4"], torch.float32, ("fused",)),
        ]
    if only is not None:
        unknown = sorted({shape for shape, _, _ in only} - set(by_name))
        if unknown:
            raise ValueError(f"--sweep-plan: unknown shapes {unknown}; known: {sorted(by_name)}")
        plan = [(by_name[shape], DTYPES[dtype], (kernel,)) for shape, dtype, kernel in only]
    for problem, dtype, kernels in plan:
        dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
        geo, runs, x = _kernel_runs(problem, device, dtype)
        for entry in kernels:
            kernel, _, variant = entry.partition(":")  # "forward:flat": the default and flat candidates
            run = runs[kernel]
            default = tdc._default_config(kernel, geo, x)
            tf32 = tdc._products_on_matrix_unit(dtype)
            candidates = list(dict.fromkeys([default, *tdc._candidates(kernel, geo, dtype, tf32)]))
            if variant:
                candidates = [default, *(c for c in candidates[1:] if getattr(c, variant))]
            if smoke:  # the default, and with a variant its first candidate (compared with the default)
                candidates = candidates[: 2 if variant else 1]
            results, capped, diffs = [], set(), {}
            reference: tuple[torch.Tensor, ...] | None = None
            for config in candidates:
                if clock.left() < 0.03 * clock.budget:
                    report.skipped.append(f"sweep {problem.name} {dtype_name} {kernel} {config}")
                    continue
                tdc.CONFIG_OVERRIDES[kernel] = config
                caps = len(tdc_launch._stage_caps)
                try:
                    ms = kernel_ms(run, device)
                    if len(tdc_launch._stage_caps) != caps:  # short of shared memory: fewer stages ran
                        capped.add(config)
                    # The default runs first: what every other candidate's results are compared with.
                    outputs = _tensors(run())
                    if config == default:
                        reference = outputs
                    if reference is not None:
                        diffs[config] = _relative_difference(outputs, reference)
                    results.append((ms, config))
                except Exception as e:
                    results.append((math.inf, config))
                    print(f"  {kernel} {config}: {type(e).__name__}", flush=True)
                finally:
                    tdc.CONFIG_OVERRIDES.pop(kernel, None)
            best = min(results, key=lambda t: t[0], default=None)
            limit = 2e-3 if dtype == torch.float32 else 2e-2
            for ms, config in sorted(results, key=lambda t: t[0]):
                # n/a: the candidate failed, or the default did (nothing to compare with).
                diff = diffs.get(config)
                verdict = "n/a" if diff is None else f"{diff:.1e}" + ("" if diff <= limit else " **differs**")
                tag = ("default " if config == default else "") + (
                    "best" if best and config == best[1] else ""
                )
                if config in capped:
                    tag += " (ran with fewer stages: too little shared memory)"
                c = (config.block_m, config.block_n, config.block_k, config.num_warps, config.num_stages)
                c += (config.splits,) if config.splits > 1 else ()
                c += config.variants()
                report.add(
                    f"| {problem.name} | {dtype_name} | {kernel} | {c} | {fmt(ms)} | {verdict} "
                    f"| {tag.strip()} |"
                )
    report.add("")
    if tdc_launch._stage_caps:
        report.add(
            f"- {len(tdc_launch._stage_caps)} launch configuration(s) of this run needed more shared memory "
            "than this GPU has and ran with fewer pipeline stages than their config says."
        )
        report.add("")


# --------------------------------------------------------------------------------------------------
# Main


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _sweep_plan(text: str) -> list[tuple[str, str, str]]:
    """'det-c5/fp32/forward,cls-c5/fp16/forward:flat' -> [(shape, dtype name, kernel), ...], checked;
    kernel:variant sweeps the default and the candidates with that Config flag only."""
    plan = []
    kernels = (
        *tdc.VARIANT_FLAGS,
        "fused",
        *(f"{kernel}:{flag}" for kernel, flag in tdc.VARIANT_FLAGS.items()),
    )
    for entry in _names(text):
        parts = entry.split("/")
        if len(parts) != 3 or parts[1] not in DTYPES or parts[2] not in kernels:
            raise argparse.ArgumentTypeError(
                f"sweep entry {entry!r}: expected shape/dtype/kernel, dtype one of {sorted(DTYPES)}, "
                f"kernel one of {', '.join(kernels)}"
            )
        plan.append((parts[0], parts[1], parts[2]))
    return plan


def environment(device) -> str:
    import triton

    name = (
        torch.cuda.get_device_name()
        if torch.device(device).type == "cuda"
        else f"CPU ({platform.processor()})"
    )
    return (
        f"{name}; torch {torch.__version__}, triton {triton.__version__}, "
        f"torchvision {torchvision.__version__}, CUDA {torch.version.cuda}; "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for the whole run (default 330)")
    parser.add_argument("--out", type=Path, action="append", default=[], help="also write the table here")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-breakdown", action="store_true")
    parser.add_argument(
        "--fused-ab", action="store_true",
        help="time the fused backward (off by default: level with the two kernels in run 8) against them "
        "(each dtype, the --timing-shapes of up to 256 output channels)",
    )  # fmt: skip
    parser.add_argument(
        "--skip-forward-ab", action="store_true",
        help="skip timing the forward's opt-in variants (BLEND_IN_16_BIT, FLAT_CHANNELS_INNER) against it "
        "(fp16, bf16; the --timing-shapes)",
    )  # fmt: skip
    parser.add_argument(
        "--skip-data-ab", action="store_true",
        help="skip timing the data kernel with DATA_GATHERED_LAYOUT off and on (each dtype, --timing-shapes)",
    )  # fmt: skip
    parser.add_argument(
        "--problems",
        type=_names,
        default=None,
        help="correctness on these problems only (name prefixes, a,b)",
    )
    parser.add_argument(
        "--timing-shapes", type=_names, default=None, help="time these anchor shapes only (a,b)"
    )
    parser.add_argument(
        "--sweep-plan", type=_sweep_plan, default=None,
        help="sweep these instead of the default plan: shape/dtype/kernel entries, a,b (det-c5/fp32/forward; "
        "forward:flat, data:deferred_sums, weight:go_first: the default and that variant's candidates)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    if args.smoke:
        device = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --smoke to check this script on CPU)", file=sys.stderr)
        return 2
    else:
        device = "cuda"
        torch.backends.cudnn.benchmark = True
    clock = Clock(args.budget)
    report = Report()
    report.add(f"# deform_conv2d Triton kernels on {environment(device)}")
    report.add("")
    if not args.skip_correctness:
        correctness(device, report, clock, args.smoke, args.problems)
    if not args.skip_forward_ab:
        forward_ab(device, report, clock, args.smoke, args.timing_shapes)
    if not args.skip_data_ab:
        data_ab(device, report, clock, args.smoke, args.timing_shapes)
    if args.fused_ab:
        fused_ab(device, report, clock, args.smoke, args.timing_shapes)
    # The breakdown before the timing table, which can take the whole budget: a few seconds that
    # say which part of each kernel costs what (runs 3-5 of 2026-11-27 never reached it).
    if not args.skip_breakdown:
        breakdown(device, report, clock, args.smoke)
    rows = []
    if not args.skip_timing:
        rows = timing(device, report, clock, args.smoke, args.timing_shapes)
        timing_tables(rows, report)
    if not args.skip_sweep:
        sweep(device, report, clock, args.smoke, args.sweep_plan)
    report.add(f"Total {clock.elapsed():.0f} s.")
    if report.skipped:
        report.add("Skipped for time: " + "; ".join(report.skipped))
    report.add("Failures: " + ("; ".join(report.failures) if report.failures else "none"))

    slug = re.sub(
        r"[^a-z0-9]+", "-", (torch.cuda.get_device_name() if device == "cuda" else "cpu-smoke").lower()
    )
    text = "\n".join(report.lines) + "\n"
    # A smoke run measures nothing: it writes only where --out says.
    for folder in [*([] if args.smoke else [ROOT / "benchmarks" / "results"]), *args.out]:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"gpu_{slug.strip('-')}.md").write_text(text)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
