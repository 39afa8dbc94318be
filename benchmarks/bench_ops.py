"""Benchmark deform_conv2d against F.conv2d and torchvision (see deformable.benchmark).

python benchmarks/bench_ops.py                       # CPU shapes, fp32, 2 threads
python benchmarks/bench_ops.py --device cuda         # the seven anchor shapes x fp32/fp16/bf16
python benchmarks/bench_ops.py --small               # a quick check (used by `make demo`)
"""

from __future__ import annotations

import sys

from deformable.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
