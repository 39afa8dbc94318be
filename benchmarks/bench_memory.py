"""Peak extra memory of deform_conv2d forward+backward on CPU against the aten backend's budget.

Runs the case in a fresh process with glibc's mmap threshold pinned low, so that freed blocks go back
to the system and the peak resident size tracks live memory. "Extra" = peak - resident size before
the call - what the results themselves need (output, its gradient, the four input gradients).

    python benchmarks/bench_memory.py                      # batch 64, 256 channels, 56x56 (the issue's case)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time, torch
    from deformable.ops import deform_conv2d, get_memory_budget
    n, c, h, w = (int(v) for v in sys.argv[1:5])
    torch.set_num_threads(2)
    x = torch.randn(n, c, h, w, requires_grad=True)
    weight = torch.randn(c, c, 3, 3, requires_grad=True)
    offset = torch.randn(n, 18, h, w, requires_grad=True)
    mask = torch.rand(n, 9, h, w, requires_grad=True)
    small = (x[:1, :, :4, :4], offset[:1, :, :4, :4], weight, None, 1, 1, 1, mask[:1, :, :4, :4])
    deform_conv2d(*small).sum().backward()  # library initialisation is not counted
    weight.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    out = deform_conv2d(x, offset, weight, None, 1, 1, 1, mask)
    out.backward(torch.ones_like(out))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results = 2 * out.numel() * 4 + sum(t.numel() * 4 for t in (x, weight, offset, mask))
    print(json.dumps({"extra": peak - before - results, "budget": get_memory_budget(), "seconds": seconds}))
    """
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[64, 256, 56, 56], metavar=("N", "C", "H", "W"))
    parser.add_argument("--out", default="benchmarks/results/memory_cpu.md")
    args = parser.parse_args()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, args.shape)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    import torch

    from deformable.benchmark import publish

    line = (
        f"| {tuple(args.shape)} | {result['budget'] / 2**20:.0f} | {result['extra'] / 2**20:.1f} "
        f"| {result['extra'] / result['budget']:.2f} | {result['seconds']:.1f} |"
    )
    text = "\n".join(
        [
            "# deform_conv2d forward+backward memory on CPU (aten backend)",
            "",
            f"- torch {torch.__version__}, 2 threads, date {datetime.date.today().isoformat()}",
            "- extra = peak resident size - size before - the results (output, its gradient, input grads)",
            "",
            "| shape (N, C, H, W) | budget MiB | extra MiB | extra / budget | seconds |",
            "|---|---|---|---|---|",
            line,
            "",
        ]
    )
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
