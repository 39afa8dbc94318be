"""Host cost of finding a compiled Triton kernel: Triton's dispatcher vs ``ops/_triton/_launch.py``.

Both sides get the deform_conv2d forward kernel's real argument list (det-c4: 256 channels, 50x84)
and stop where the compiled kernel's launcher would be called, which is the same call for both, so
no GPU is needed:

- baseline: what ``JITFunction.run`` does per call to find the kernel: its binder (argument
  specialisation) and ``compute_cache_key`` (Triton's sm_90 backend);
- ours: ``_launch``'s key, cache lookup and positional argument list (a cache hit).

    python benchmarks/bench_launch.py --out benchmarks/results/launch_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import timeit
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from deformable.benchmark import machine_description, publish  # noqa: E402
from deformable.ops._triton import _deform_conv_kernels as kernels  # noqa: E402
from deformable.ops._triton import _launch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()

    fn = kernels.deform_conv_fwd_kernel
    jit = fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)  # also under TRITON_INTERPRET=1
    x = torch.randn(2, 50, 84, 256)
    tensors = (x, torch.randn(2, 18, 50, 84), torch.rand(2, 9, 50, 84), torch.randn(1, 9, 256, 256))
    tensors += (torch.randn(256), torch.empty(2, 256, 50, 84))
    # ... spatial arguments, TILES (2 images x 66 tiles of 64 pixels), TAPS_PER_SPLIT, then the
    # offset, mask and output strides (NCHW)
    ints = (2, 50, 84, 256, 4200, 84, 256, 256, 256, 9, 3, 1, 1, 1, 1, 1, 1, 132, 9)
    ints += (18 * 4200, 4200, 1, 9 * 4200, 4200, 1, 256 * 4200, 4200, 1)
    positional = (*tensors, *ints)
    constexprs = dict(
        HAS_MASK=True, HAS_BIAS=True, SPLIT_TAPS=False, INDEX64=False, W_K_MAJOR=True, BLOCK_M=64,
        BLOCK_N=256, BLOCK_K=32, MMA=1, PRECISION="tf32", CT=tl.float32,
    )  # fmt: skip
    options = dict(num_warps=8, num_stages=3)

    binder = create_function_from_signature(jit.signature, jit.params, CUDABackend(GPUTarget("cuda", 90, 32)))
    key_cache: dict = {}

    def triton_lookup():
        _, specialization, opts = binder(*positional, **options, **constexprs)
        return compute_cache_key(key_cache, specialization, opts)

    _launch.clear_cache()
    _launch._tails[id(jit)] = _launch._tail_spec(jit, len(positional))
    cache = {_launch._key(jit, 0, positional, constexprs, 8, 3): object()}

    def our_lookup():
        compiled = cache.get(_launch._key(jit, 0, positional, constexprs, 8, 3))
        return compiled, (*positional, *_launch._tail_values(jit, constexprs))

    assert our_lookup()[0] is not None
    rows = []
    for name, call in (
        ("Triton: binder + cache key", triton_lookup),
        ("ours: key + lookup + arguments", our_lookup),
    ):
        call()
        best = min(timeit.repeat(call, number=args.number, repeat=5)) / args.number * 1e6
        rows.append((name, best))
        print(f"{name}: {best:.2f} us", flush=True)
    lines = [
        "# Host cost of finding a compiled Triton kernel (deform_conv2d forward, det-c4 arguments)",
        "",
        f"- machine: {machine_description(torch.device('cpu'))}, {platform.system()}; Python "
        f"{platform.python_version()}; torch {torch.__version__}; triton {triton.__version__}; "
        f"{datetime.date.today()}",
        f"- best of 5 x {args.number} calls each; both stop before the launcher call they share",
        "",
        "| path | us per launch | vs Triton |",
        "|---|---|---|",
    ]
    base = rows[0][1]
    lines += [f"| {name} | {us:.2f} | {us / base:.2f}x |" for name, us in rows]
    text = "\n".join(lines) + "\n"
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
