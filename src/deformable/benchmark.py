"""Operator benchmark: deform_conv2d vs F.conv2d vs torchvision, interleaved in one run.

Used by ``benchmarks/bench_ops.py`` and ``deformable bench``. Shapes are the 3x3 convolutions of
ResNet-50 stages conv3-conv5 (``shared/anchors``): detector size (batch 2, 800x1333 input) and
classifier size (batch 64, 224x224) on GPU; three smaller ones on CPU. Every figure is a median over
interleaved repetitions, and every claim is a ratio against the baseline measured in the same run.
"""

from __future__ import annotations

import contextlib
import datetime
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .ops import deform_conv2d


@dataclass(frozen=True)
class Shape:
    """One benchmark case: input [N, C, H, W], a C -> C 3x3 convolution with ``stride``."""

    name: str
    batch: int
    channels: int
    height: int
    width: int
    stride: int = 1


GPU_SHAPES = (
    Shape("det-c3", 2, 128, 100, 168),
    Shape("det-c4", 2, 256, 50, 84),
    Shape("det-c5", 2, 512, 25, 42),
    Shape("det-c4-s2", 2, 256, 100, 168, 2),
    Shape("cls-c3", 64, 128, 28, 28),
    Shape("cls-c4", 64, 256, 14, 14),
    Shape("cls-c5", 64, 512, 7, 7),
)
CPU_SHAPES = (
    Shape("det-c5", 1, 512, 25, 42),
    Shape("det-c4", 1, 256, 50, 84),
    Shape("cls-c4", 8, 256, 14, 14),
)
SMALL_SHAPES = (Shape("small", 1, 64, 24, 24),)


@dataclass
class Row:
    """Medians (ms) of one shape and dtype; None where an implementation cannot run."""

    shape: Shape
    dtype: torch.dtype
    times: dict[str, float | None] = field(default_factory=dict)
    peak_mib: dict[str, float | None] = field(default_factory=dict)

    def ratio(self, name: str, baseline: str) -> float | None:
        a, b = self.times.get(name), self.times.get(baseline)
        return None if a is None or b is None else a / b


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(enabled)`` for the block, the previous setting (and its
    ``warn_only``) restored after it."""
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes PyTorch's allocators hold while ``fn`` runs, above what they held before.

    Counted from the profiler's allocation and release events, so it works on any device, CPU
    included (where the allocator keeps no peak statistic). Tensors ``fn`` returns count as held.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _make_cases(shape: Shape, dtype: torch.dtype, device: torch.device, backend: str | None):
    """The timed callables of one shape: {name: fn}."""
    torch.manual_seed(0)
    n, c = shape.batch, shape.channels
    x = torch.randn(n, c, shape.height, shape.width, device=device, dtype=dtype)
    weight = torch.randn(c, c, 3, 3, device=device, dtype=dtype) / (3 * c**0.5)
    out_h = (shape.height - 1) // shape.stride + 1
    out_w = (shape.width - 1) // shape.stride + 1
    offset = 2.0 * torch.randn(n, 18, out_h, out_w, device=device, dtype=dtype)
    mask = torch.rand(n, 9, out_h, out_w, device=device, dtype=dtype)
    grad = torch.randn(n, c, out_h, out_w, device=device, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask, weight)]
    x_cl = x.contiguous(memory_format=torch.channels_last)
    x_cl_leaf = x_cl.clone().requires_grad_()
    grad_cl = grad.contiguous(memory_format=torch.channels_last)

    def conv(inp):
        return F.conv2d(inp, weight, stride=shape.stride, padding=1)

    def conv_train(inp, g):
        return torch.autograd.grad(
            F.conv2d(inp, leaves[3], stride=shape.stride, padding=1), (inp, leaves[3]), g
        )

    def ours(x_, off_, m_, w_):
        return deform_conv2d(x_, off_, w_, None, shape.stride, 1, 1, m_, backend=backend)

    def ours_train():
        return torch.autograd.grad(ours(*leaves), leaves, grad)

    cases = {
        "conv_fwd": lambda: conv(x),
        "conv_fwdbwd": lambda: conv_train(leaves[0], grad),
        "ours_fwd": lambda: ours(x, offset, mask, weight),
        "ours_fwdbwd": ours_train,
    }
    if device.type == "cuda":
        cases["conv_cl_fwd"] = lambda: conv(x_cl)
        cases["conv_cl_fwdbwd"] = lambda: conv_train(x_cl_leaf, grad_cl)
    try:
        import torchvision.ops

        torchvision.ops.deform_conv2d(
            x[:1, :, :4, :4], offset[:1, :, :4, :4], weight, None, 1, 1, 1, mask[:1, :, :4, :4]
        )

        def tv(x_, off_, m_, w_):
            return torchvision.ops.deform_conv2d(x_, off_, w_, None, shape.stride, 1, 1, m_)

        cases["tv_fwd"] = lambda: tv(x, offset, mask, weight)
        cases["tv_fwdbwd"] = lambda: torch.autograd.grad(tv(*leaves), leaves, grad)
    except (RuntimeError, NotImplementedError, ImportError):
        pass  # torchvision has no bf16 and no CPU fp16: the row shows "n/a".
    return cases


def run(
    shapes=CPU_SHAPES,
    dtypes=(torch.float32,),
    device: str | torch.device = "cpu",
    repeats: int = 7,
    warmup: int = 2,
    backend: str | None = None,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Time every case of every shape and dtype, interleaving implementations within a repetition."""
    device = torch.device(device)
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            cases = _make_cases(shape, dtype, device, backend)
            samples: dict[str, list[float]] = {name: [] for name in cases}
            peaks: dict[str, float | None] = {}
            for name, fn in cases.items():
                for _ in range(warmup):
                    fn()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    fn()
                    peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            for _ in range(repeats):
                for name, fn in cases.items():
                    samples[name].append(_time_once(fn, device))
            medians = {k: statistics.median(v) for k, v in samples.items()}
            for stage in ("fwd", "fwdbwd"):
                if f"conv_cl_{stage}" in medians:
                    medians[f"conv_{stage}"] = min(medians[f"conv_{stage}"], medians[f"conv_cl_{stage}"])
            row = Row(shape, dtype, dict(medians), peaks)
            rows.append(row)
            log(_format_row(row))
    return rows


def _fmt(value: float | None, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.2f}{suffix}"


HEADER = (
    "| shape (N, C, H, W, s) | dtype | conv fwd ms | ours fwd ms | tv fwd ms | ours/conv fwd | tv/conv fwd "
    "| conv f+b ms | ours f+b ms | tv f+b ms | ours/conv f+b | tv/conv f+b | tv/ours f+b |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _format_row(row: Row) -> str:
    s, t = row.shape, row.times
    return (
        f"| {s.name} ({s.batch}, {s.channels}, {s.height}, {s.width}, {s.stride}) "
        f"| {str(row.dtype).removeprefix('torch.')} "
        f"| {_fmt(t.get('conv_fwd'))} | {_fmt(t.get('ours_fwd'))} | {_fmt(t.get('tv_fwd'))} "
        f"| {_fmt(row.ratio('ours_fwd', 'conv_fwd'), 'x')} | {_fmt(row.ratio('tv_fwd', 'conv_fwd'), 'x')} "
        f"| {_fmt(t.get('conv_fwdbwd'))} | {_fmt(t.get('ours_fwdbwd'))} | {_fmt(t.get('tv_fwdbwd'))} "
        f"| {_fmt(row.ratio('ours_fwdbwd', 'conv_fwdbwd'), 'x')} "
        f"| {_fmt(row.ratio('tv_fwdbwd', 'conv_fwdbwd'), 'x')} "
        f"| {_fmt(row.ratio('tv_fwdbwd', 'ours_fwdbwd'), 'x')} |"
    )


def publish(text: str, out: str | Path | None) -> None:
    """Print a benchmark's report and, when ``out`` is given, write it there (folders created)."""
    print(text)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


def machine_description(device: torch.device) -> str:
    """CPU model and threads, or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(rows: list[Row], device: torch.device, backend: str | None) -> str:
    """A results table with machine, versions and date."""
    try:
        import torchvision

        tv_version = torchvision.__version__
    except ImportError:
        tv_version = "not installed"
    lines = [
        f"# deform_conv2d benchmark ({device.type})",
        "",
        f"- machine: {machine_description(device)}",
        f"- torch {torch.__version__}, torchvision {tv_version}, backend {backend or 'auto'}",
        f"- date: {datetime.date.today().isoformat()}",
        "- 3x3 conv C -> C, padding 1, with mask; offsets ~ N(0, 2^2) px; medians of interleaved runs.",
        "- ours/conv and tv/conv: times relative to F.conv2d measured in the same run "
        + ("(the faster of NCHW and channels_last)." if device.type == "cuda" else "(NCHW)."),
        "",
        HEADER,
        *(_format_row(r) for r in rows),
    ]
    if device.type == "cuda":
        lines += ["", "Peak extra memory of forward+backward (MiB):", ""]
        lines += ["| shape | dtype | conv | ours | tv |", "|---|---|---|---|---|"]
        for r in rows:
            p = r.peak_mib
            lines.append(
                f"| {r.shape.name} | {str(r.dtype).removeprefix('torch.')} | {_fmt(p.get('conv_fwdbwd'))} "
                f"| {_fmt(p.get('ours_fwdbwd'))} | {_fmt(p.get('tv_fwdbwd'))} |"
            )
    return "\n".join(lines) + "\n"
