"""The ``deformable`` command line: ``deformable demo | bench | info``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def _cmd_info(args: argparse.Namespace) -> int:
    from . import __version__
    from .ops._backend import resolve_backend, triton_available

    print(f"deformable {__version__}")
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    print(f"triton installed: {triton_available()}")
    print(f"automatic backend: cpu -> {resolve_backend(None, torch.device('cpu'))}", end="")
    if torch.cuda.is_available():
        print(f", cuda -> {resolve_backend(None, torch.device('cuda'))}")
    else:
        print()
    from .ops import get_memory_budget

    print(f"aten backend memory budget: {get_memory_budget() / 2**20:.0f} MiB")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import benchmark

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.small:
        shapes = benchmark.SMALL_SHAPES
    elif device.type == "cuda":
        shapes = benchmark.GPU_SHAPES
    else:
        shapes = benchmark.CPU_SHAPES
    dtypes = [
        DTYPES[d] for d in (args.dtypes or (["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32"]))
    ]
    print(benchmark.HEADER)
    rows = benchmark.run(shapes, dtypes, device, repeats=args.repeats, backend=args.backend)
    table = benchmark.markdown(rows, device, args.backend)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        print(f"wrote {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .nn import DCNv2

    torch.manual_seed(0)
    print("DCNv2 layer demo: a drop-in for nn.Conv2d that predicts its own offsets and masks.")
    conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    layer = DCNv2.from_conv2d(conv)
    x = torch.randn(2, 16, 20, 20)
    y = layer(x)
    print(f"  input {tuple(x.shape)} -> output {tuple(y.shape)}")
    same = torch.allclose(
        y, 0.5 * (conv(x) - conv.bias.view(1, -1, 1, 1)) + conv.bias.view(1, -1, 1, 1), atol=1e-5
    )
    print(f"  at initialisation (zero offsets, mask 0.5) it equals half the convolution: {same}")
    y.square().mean().backward()
    norm = layer.conv_offset.weight.grad.norm().item()
    print(f"  gradient reaches the offset/mask branch: |grad| = {norm:.3e}")
    print("\nOperator benchmark at a small size (median ms, ratios vs F.conv2d in the same run):")
    bench = argparse.Namespace(
        device="cpu", threads=None, small=True, dtypes=["fp32"], repeats=5, backend=None, out=None
    )
    return _cmd_bench(bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deformable", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job: a short demonstration (see README)")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="time deform_conv2d against F.conv2d and torchvision")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    bench.add_argument(
        "--dtypes", nargs="+", choices=sorted(DTYPES), help="default: fp32 on CPU, all on CUDA"
    )
    bench.add_argument("--repeats", type=int, default=7, help="interleaved repetitions (default: 7)")
    bench.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs")
    bench.add_argument("--backend", choices=["reference", "aten", "triton"], help="default: automatic")
    bench.add_argument("--small", action="store_true", help="one small shape, for a quick check")
    bench.add_argument("--out", help="write the markdown table here (e.g. benchmarks/results/ops_cpu.md)")
    bench.set_defaults(func=_cmd_bench)

    info = sub.add_parser("info", help="versions, devices and backends")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
