"""Regular vs DCNv2 Faster R-CNN R50-FPN: inference (batch 1) and a training step (batch 2), one run.

Models have random weights (speed does not depend on them). Variants: regular (RoIAlign), DCNv2 in
conv3-conv5 (RoIAlign), DCNv2 + modulated deformable RoI pooling. Every variant is timed in the same
interleaved loop; the table gives medians and ratios to the regular model, and peak memory on CUDA.

    python benchmarks/bench_models.py                          # CPU, 320x480 images
    python benchmarks/bench_models.py --device cuda            # 800x1216, the issue's size
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

from deformable.benchmark import machine_description
from deformable.models import fasterrcnn_resnet50_fpn_dcn

VARIANTS = {
    "regular": dict(dcn=None, roi_pool="align"),
    "DCNv2 c3-c5": dict(dcn="v2", roi_pool="align"),
    "DCNv2 c3-c5 + mdpool": dict(dcn="v2", roi_pool="mdpool"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), help="default 800 1216 (cuda), 320 480 (cpu)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="markdown file (default benchmarks/results/models_<device>.md)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    height, width = args.size or ((800, 1216) if device.type == "cuda" else (320, 480))
    torch.manual_seed(0)
    models = {}
    for name, variant in VARIANTS.items():
        model = fasterrcnn_resnet50_fpn_dcn(num_classes=91, min_size=height, max_size=width, **variant)
        models[name] = model.to(device)
    images = [torch.rand(3, height, width, device=device) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[40.0, 50.0, 200.0, 220.0], [100, 30, 300, 160]], device=device),
         "labels": torch.tensor([1, 7], device=device)}
        for _ in range(2)
    ]  # fmt: skip

    def infer(model):
        model.eval()
        with torch.no_grad():
            model(images[:1])

    def train_step(model):
        model.train()
        losses = model(images, targets)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)

    cases = {
        (name, kind): (fn, model)
        for name, model in models.items()
        for kind, fn in (("infer", infer), ("train", train_step))
    }
    times = {key: [] for key in cases}
    peaks = {}
    for key, (fn, model) in cases.items():
        fn(model)  # warm-up (and first-call compilation on CUDA)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            fn(model)
            peaks[key] = torch.cuda.max_memory_allocated(device) / 2**30
    for _ in range(args.repeats):
        for key, (fn, model) in cases.items():
            _sync(device)
            start = time.perf_counter()
            fn(model)
            _sync(device)
            times[key].append(1000 * (time.perf_counter() - start))
    median = {key: statistics.median(v) for key, v in times.items()}
    lines = [
        f"# Faster R-CNN R50-FPN: regular vs DCNv2 ({device.type})",
        "",
        f"- machine: {machine_description(device)}; torch {torch.__version__}; "
        f"date {datetime.date.today().isoformat()}",
        f"- images {height}x{width}; inference batch 1, training step batch 2; "
        f"medians of {args.repeats} interleaved runs",
        "",
        "| variant | inference ms | vs regular | train step ms | vs regular |"
        + (" peak GiB (train) |" if peaks else ""),
        "|---|---|---|---|---|" + ("---|" if peaks else ""),
    ]
    for name in models:
        infer_ms, train_ms = median[(name, "infer")], median[(name, "train")]
        row = (
            f"| {name} | {infer_ms:.0f} | {infer_ms / median[('regular', 'infer')]:.2f}x "
            f"| {train_ms:.0f} | {train_ms / median[('regular', 'train')]:.2f}x |"
        )
        if peaks:
            row += f" {peaks[(name, 'train')]:.2f} |"
        lines.append(row)
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out or f"benchmarks/results/models_{device.type}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
