"""Deformable RoI pooling against torchvision's RoIAlign, in one interleaved run.

512 RoIs over a 4-level FPN of 256 channels for an 800x1333 image (levels 200x334, 100x167, 50x84,
25x42), output 7x7 and 14x14, forward (no grad) and forward+backward:

* ``MultiScaleDeformRoIPool.pool`` with random offsets and mask (the pooling op of the module, all
  four levels) against ``torchvision.ops.MultiScaleRoIAlign``;
* the raw ``deform_roi_pool`` op with offsets and mask on one stride-16 map (50x84, the paper's
  single-level C5 head) against ``torchvision.ops.roi_align`` on the same map;
* for information, the whole ``MultiScaleDeformRoIPool`` module (RoIAlign + fc branch + deformable
  pooling), also against ``MultiScaleRoIAlign``.

Cases run round-robin, ``--repeats`` times each, and the medians are compared (ratio = ours /
torchvision; the target is <= 2). Results go to ``benchmarks/results/roi_pool_<device>.md`` (one
section per run with ``--append``).

On a shared, oversubscribed CPU, OpenMP's default active waiting makes every parallel ATen region wait
for a descheduled thread; the fast path is a sequence of ATen ops, so run it there with
``OMP_WAIT_POLICY=PASSIVE`` as well (the policy is recorded in the results).

    python benchmarks/bench_roi_pool.py                 # CPU, 2 threads
    python benchmarks/bench_roi_pool.py --threads 2 1   # one interleaved run per thread count
    python benchmarks/bench_roi_pool.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign, roi_align

from deformable.benchmark import cpu_model, machine_description
from deformable.nn.deform_roi_pool import MultiScaleDeformRoIPool
from deformable.ops.deform_roi_pool import deform_roi_pool

IMAGE = (800, 1333)
LEVELS = OrderedDict([("p2", (200, 334)), ("p3", (100, 167)), ("p4", (50, 84)), ("p5", (25, 42))])
CHANNELS = 256


def make_boxes(num: int, generator: torch.Generator) -> torch.Tensor:
    """Proposal-like boxes: sqrt(area) log-uniform in [16, 800] px, aspect ratio in [1/2, 2], clipped."""
    size = torch.exp(torch.empty(num).uniform_(math.log(16), math.log(800), generator=generator))
    ratio = torch.exp(torch.empty(num).uniform_(math.log(0.5), math.log(2.0), generator=generator))
    w, h = size * ratio.sqrt(), size / ratio.sqrt()
    cx = torch.rand(num, generator=generator) * IMAGE[1]
    cy = torch.rand(num, generator=generator) * IMAGE[0]
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, IMAGE[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, IMAGE[0])
    return boxes


def measure(fns: list[Callable[[], None]], repeats: int, sync: Callable[[], None]) -> list[list[float]]:
    """Seconds of every call: one warm-up each, then ``repeats`` round-robin passes over all of them."""
    for fn in fns:
        fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[i].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[2], help="torch.set_num_threads (CPU); one run per value"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rois", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[7, 14])
    parser.add_argument("--no-module", action="store_true", help="skip the full-module (fc branch) rows")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--append", action="store_true", help="add a section to an existing results file")
    args = parser.parse_args()

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    features = OrderedDict(
        (name, torch.randn(1, CHANNELS, h, w, generator=generator).to(device))
        for name, (h, w) in LEVELS.items()
    )
    boxes = [make_boxes(args.rois, generator).to(device)]
    image_shapes = [IMAGE]
    rois16 = torch.cat([torch.zeros(args.rois, 1, device=device), boxes[0]], dim=1)
    names = list(LEVELS)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Leaves shared by every case; forward+backward cases drop the gradients they accumulated.
    leaves = OrderedDict((k, v.clone().requires_grad_()) for k, v in features.items())

    def clear() -> None:
        for tensor in leaves.values():
            tensor.grad = None

    cases: list[tuple[str, str, str, str, Callable[[], None]]] = []  # (group, size, pass, baseline, fn)
    for size in args.sizes:
        tv_pool = MultiScaleRoIAlign(names, size, 0)
        ours = MultiScaleDeformRoIPool(names, size, 0, in_channels=CHANNELS).to(device)
        offset = torch.randn(args.rois, 2, size, size, generator=generator).mul_(0.5).to(device)
        mask = torch.rand(args.rois, 1, size, size, generator=generator).to(device)
        grad = torch.randn(args.rois, CHANNELS, size, size, generator=generator).to(device)
        offset_leaf, mask_leaf = offset.clone().requires_grad_(), mask.clone().requires_grad_()

        def tv_ms(feats, _pool=tv_pool):
            return _pool(feats, boxes, image_shapes)

        def ours_ms(feats, _ours=ours, _offset=offset, _mask=mask, _ol=offset_leaf, _ml=mask_leaf):
            grad_mode = torch.is_grad_enabled()
            return _ours.pool(
                feats, boxes, image_shapes, _ol if grad_mode else _offset, _ml if grad_mode else _mask
            )

        def tv_one(feats, _size=size):
            return roi_align(feats["p4"], rois16, _size, 1 / 16, 0, False)

        def ours_one(feats, _size=size, _offset=offset, _mask=mask, _ol=offset_leaf, _ml=mask_leaf):
            grad_mode = torch.is_grad_enabled()
            off, msk = (_ol, _ml) if grad_mode else (_offset, _mask)
            return deform_roi_pool(feats["p4"], rois16, off, msk, _size, 1 / 16, 0)

        def module_ms(feats, _ours=ours):
            return _ours(feats, boxes, image_shapes)

        def forward(fn):
            def run():
                with torch.no_grad():
                    fn(features)

            return run

        branch_parameters = list(ours.parameters())

        def forward_backward(fn, _grad=grad, _leaves=(offset_leaf, mask_leaf, *branch_parameters)):
            def run():
                fn(leaves).backward(_grad)
                clear()
                for leaf in _leaves:
                    leaf.grad = None

            return run

        groups = [
            (
                "FPN, 4 levels: MultiScaleDeformRoIPool.pool (offsets + mask)",
                "MultiScaleRoIAlign",
                tv_ms,
                ours_ms,
            ),
            (
                "one stride-16 map (50x84): raw deform_roi_pool (offsets + mask)",
                "roi_align",
                tv_one,
                ours_one,
            ),
        ]
        if not args.no_module:
            groups.append(
                (
                    "FPN: whole MultiScaleDeformRoIPool (RoIAlign + fc branch + pooling)",
                    "MultiScaleRoIAlign",
                    tv_ms,
                    module_ms,
                )
            )
        for group, tv_name, baseline, candidate in groups:
            for label, wrap in (("forward", forward), ("forward+backward", forward_backward)):
                cases.append((group, f"{size}x{size}", label, tv_name, wrap(baseline)))
                cases.append((group, f"{size}x{size}", label, "ours", wrap(candidate)))

    rows = []
    loads = []
    for threads in args.threads:
        if device.type == "cpu":
            torch.set_num_threads(threads)
        load_before = os.getloadavg()[0]
        times = measure([case[-1] for case in cases], args.repeats, sync)
        loads.append(f"{threads} thread(s): {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
        for i in range(0, len(cases), 2):
            group, size, label, tv_name, _ = cases[i]
            base = statistics.median(times[i]) * 1e3
            mine = statistics.median(times[i + 1]) * 1e3
            spread = (max(times[i + 1]) - min(times[i + 1])) * 1e3
            rows.append((group, size, label, threads, tv_name, base, mine, spread, mine / base))

    machine = cpu_model() if device.type == "cpu" else machine_description(device)
    header = [
        f"# Deformable RoI pooling vs torchvision RoIAlign ({device.type})",
        "",
        f"- machine: {machine}, {os.cpu_count()} logical CPUs visible",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Python {platform.python_version()}",
        f"- workload: {args.rois} RoIs on an {IMAGE[0]}x{IMAGE[1]} image, 4-level FPN of {CHANNELS} channels "
        f"({', '.join(f'{h}x{w}' for h, w in LEVELS.values())}), sampling_ratio=0 (adaptive), fp32, batch 1; "
        "random offsets (N(0, 0.5^2)) and masks (U(0, 1)); forward = no grad; forward+backward = grads "
        "of features, offsets and mask (and of the fc branch for the whole module)",
        "- ratio = ours / baseline, medians of interleaved repeats (all cases round-robin); target <= 2",
        "",
    ]
    policy = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    section = [
        f"## {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}: torch threads "
        f"{', '.join(str(t) for t in args.threads)}, OMP_WAIT_POLICY={policy}",
        "",
        f"{args.repeats} repeats; 1-minute load average before -> after: {'; '.join(loads)}",
        "",
        "| case | output | pass | threads | baseline | baseline ms | ours ms | ours spread ms "
        "| ours / baseline |",
        "|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for group, size, label, threads, tv_name, base, mine, spread, ratio in rows:
        section.append(
            f"| {group} | {size} | {label} | {threads} | {tv_name} | {base:.1f} | {mine:.1f} | {spread:.1f} "
            f"| {ratio:.2f} |"
        )
    section.append("")
    out = args.out or Path(__file__).resolve().parent / "results" / f"roi_pool_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = out.read_text() if args.append and out.exists() else "\n".join(header) + "\n"
    text = previous + "\n".join(section) + "\n"
    print("\n".join(section))
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
