"""Memory traffic of the Triton deform_conv2d kernels, modelled on a CPU, beside measured GPU times.

    python benchmarks/triton_traffic.py [--measured benchmarks/results/gpu_nvidia-h200.md] [--out FILE]

For each anchor shape of ``shared/anchors`` (fp16 and TF32 fp32, the heuristic's default launch
configurations for a 132-multiprocessor GPU), the bytes each kernel's programs request, counted from
the kernels' loops, not measured:

- forward: per program the four bilinear neighbours of its pixels for every tap and input channel
  (gathers) and the whole weight slice of its output channels (each pixel tile reads it again);
- data gradient: per (pixel tile, tap) program the grad_out tile (once per channel block unless one
  block covers the output channels), the tap's weight matrix, the four neighbours (offset and mask
  gradients) and the four fp32 atomic adds per sampled channel (input gradient);
- weight gradient: per (tap, input-channel block, output-channel block) the four neighbours of every
  pixel and the grad_out tile of every pixel.

The wrapper's own passes (channels-last copies, weight layout, zeroing and converting the fp32
input-gradient accumulator, and the channels-last copy of grad_out where NCHW rows would not start on
16-byte vectors, charged to the weight kernel, which runs first) are counted apart, as DRAM traffic.
With ``--measured``, the measured kernel times of a gpu_check.py report (its ``ours graph fwd``,
else ``ours fwd``, and ``ours bwd data`` and ``ours bwd weight`` columns, which include the wrapper)
give the bytes per second each kernel achieved: the kernels furthest below the L2's bandwidth are
bound by latency or by atomics, not by traffic.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from deformable.benchmark import publish  # noqa: E402
from deformable.ops._triton.deform_conv import _Geometry, _grad_out_operand, _heuristic  # noqa: E402

ANCHORS = {
    "det-c3": (2, 128, 100, 168, 1), "det-c4": (2, 256, 50, 84, 1), "det-c5": (2, 512, 25, 42, 1),
    "det-c4-s2": (2, 256, 100, 168, 2), "cls-c3": (64, 128, 28, 28, 1), "cls-c4": (64, 256, 14, 14, 1),
    "cls-c5": (64, 512, 7, 7, 1),
}  # fmt: skip
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
SMS = 132
MB = 1e6


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def geometry(name: str) -> _Geometry:
    n, c, h, w, s = ANCHORS[name]
    return _Geometry(n, c, h, w, c, 1, 3, 3, 1, (h - 1) // s + 1, (w - 1) // s + 1, (s, s), (1, 1), (1, 1))


def traffic(geo: _Geometry, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """{kernel: {"programs", "gather", "weight", "grad_out", "atomic", "wrapper", "flop"}} in bytes."""
    elt = torch.finfo(dtype).bits // 8
    taps, c_in, c_out = geo.taps, geo.in_channels, geo.out_channels
    pixels = geo.pixels
    flop = 2.0 * pixels * taps * c_in * c_out
    x_bytes = geo.batch * c_in * geo.height * geo.width * elt
    w_bytes = c_out * c_in * taps * elt
    layout = 2 * x_bytes + 2 * w_bytes  # channels-last copy and weight layout: read + write each

    f = _heuristic("forward", geo, dtype, interpreted=False, sms=SMS)
    tiles = geo.pixel_tiles(f.block_m)
    forward_programs = tiles * _cdiv(c_out, f.block_n)
    forward = {
        "programs": forward_programs,
        "gather": forward_programs * 4.0 * f.block_m * c_in * taps * elt,
        "weight": forward_programs * taps * c_in * min(f.block_n, c_out) * elt,
        "grad_out": 0.0,
        "atomic": 0.0,
        "wrapper": layout + pixels * c_out * elt,  # + the output's write
        "flop": flop,
    }

    d = _heuristic("data", geo, dtype, interpreted=False, sms=SMS)
    data_programs = geo.pixel_tiles(d.block_m) * taps
    go_loads = 1 if d.block_k >= c_out else _cdiv(c_in, d.block_n)
    data = {
        "programs": data_programs,
        "gather": data_programs * 4.0 * d.block_m * c_in * elt,
        "weight": data_programs * c_in * c_out * elt,
        "grad_out": data_programs * go_loads * d.block_m * c_out * elt,
        "atomic": data_programs * 4.0 * d.block_m * c_in * 4,
        # zeroing the fp32 accumulator, converting it to grad_input, the layout copies
        "wrapper": layout + geo.batch * c_in * geo.height * geo.width * (4 + 4 + elt),
        "flop": flop,
    }

    go_shape = (geo.batch, c_out, geo.out_h, geo.out_w)
    go_strides = _grad_out_operand(torch.empty(go_shape, dtype=dtype, device="meta"), dtype)[1]
    go_copy = 2 * pixels * c_out * elt if go_strides[1] == 1 else 0  # read + write

    w = _heuristic("weight", geo, dtype, interpreted=False, sms=SMS)
    channel_blocks, out_blocks = _cdiv(c_in, w.block_k), _cdiv(c_out, w.block_n)
    others = taps * channel_blocks * out_blocks
    weight_tiles = geo.pixel_tiles(w.block_m)
    splits = max(1, min(_cdiv(4 * SMS, others), _cdiv(weight_tiles, 4), 64))  # as _weight_grad splits
    splits = _cdiv(weight_tiles, _cdiv(weight_tiles, splits))
    weight = {
        "programs": others * splits,
        "gather": 4.0 * pixels * c_in * taps * elt * out_blocks,
        "weight": 0.0,
        "grad_out": 1.0 * pixels * c_out * elt * taps * channel_blocks,
        "atomic": splits * taps * c_in * c_out * 4.0,  # every split adds its partial sums
        # copies; zero, reorder the fp32 sum
        "wrapper": 2 * x_bytes + go_copy + taps * c_in * c_out * (4 + 4 + elt),
        "flop": flop,
    }
    return {"forward": forward, "data": data, "weight": weight}


def measured_times(path: Path) -> dict[tuple[str, str], dict[str, float]]:
    """{(shape, dtype): {"forward", "data", "weight": ms}} from a gpu_check.py report's speed tables:
    the forward in a CUDA graph where the report has it (its eager forward waits on the host at
    16-bit), else eager."""
    wanted = {"forward": "ours fwd", "data": "ours bwd data", "weight": "ours bwd weight"}
    header, times = None, {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "ours bwd data" in cells or "ours graph fwd" in cells:
            header = cells
            continue
        if header is None or len(cells) != len(header) or not re.match(r"^[\d.]+$", cells[2]):
            continue
        row = dict(zip(header, cells, strict=True))
        key = (row["shape"], row["dtype"])
        try:
            if "ours graph fwd" in row:
                times.setdefault(key, {})["forward"] = float(row["ours graph fwd"])
            else:
                eager = {k: float(row[v]) for k, v in wanted.items()}
                times[key] = {**eager, **times.get(key, {})}
        except (KeyError, ValueError):
            continue
    return {key: t for key, t in times.items() if len(t) == len(wanted)}


def report(measured: Path | None) -> str:
    times = measured_times(measured) if measured is not None else {}
    lines = [
        "# Memory traffic of the Triton deform_conv2d kernels (model) beside measured times",
        "",
        f"{datetime.date.today()}; counted from the kernels' loops for the default configurations of a "
        f"{SMS}-SM GPU (`benchmarks/triton_traffic.py`); MB = 1e6 bytes requested by the programs (L2 or "
        "DRAM), wrapper = the host code's layout copies and accumulator passes (DRAM)."
        + (f" Measured: `{measured}` (each kernel's time includes its wrapper)." if measured else ""),
        "",
        "| shape | dtype | kernel | programs | gather MB | weight MB | grad_out MB | fp32 atomics MB | "
        "wrapper MB | GFLOP | measured ms | achieved TB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ANCHORS:
        geo = geometry(name)
        for dtype_name, dtype in DTYPES.items():
            for kernel, t in traffic(geo, dtype).items():
                total = t["gather"] + t["weight"] + t["grad_out"] + t["atomic"] + t["wrapper"]
                ms = times.get((name, dtype_name), {}).get(kernel)
                achieved = f"{total / (ms * 1e-3) / 1e12:.2f}" if ms else ""
                cells = [
                    name, dtype_name, kernel, str(int(t["programs"])),
                    *(f"{t[k] / MB:.0f}" for k in ("gather", "weight", "grad_out", "atomic", "wrapper")),
                    f"{t['flop'] / 1e9:.1f}", f"{ms:g}" if ms else "", achieved,
                ]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", type=Path, help="a gpu_check.py report with the kernels' times")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    publish(report(args.measured), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
