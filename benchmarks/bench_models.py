"""Regular vs DCNv2 Faster R-CNN R50-FPN: inference (batch 1) and a training step (batch 2), one run.

Models have random weights (speed does not depend on them). Variants: regular (RoIAlign), DCNv2 in
conv3-conv5 (RoIAlign), DCNv2 + modulated deformable RoI pooling, and (with --torchvision, the default
on CUDA) the same DCNv2 model running torchvision's deform_conv2d instead of ours: the baseline the
anchors quote. Every variant is timed in the same interleaved loop; the table gives medians and ratios
to the regular model, and peak memory on CUDA.

    python benchmarks/bench_models.py                          # CPU, 320x480 images
    python benchmarks/bench_models.py --device cuda            # 800x1216, the issue's size
    python benchmarks/bench_models.py --device cuda --amp bf16 # under torch.autocast
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import time

import torch
import torchvision

import deformable.nn.deform_conv as deform_conv_layers
from deformable.benchmark import machine_description, publish
from deformable.models import fasterrcnn_resnet50_fpn_dcn

VARIANTS = {
    "regular": dict(dcn=None, roi_pool="align"),
    "DCNv2 c3-c5": dict(dcn="v2", roi_pool="align"),
    "DCNv2 c3-c5 + mdpool": dict(dcn="v2", roi_pool="mdpool"),
}
TORCHVISION_VARIANT = "DCNv2 c3-c5, torchvision's op"
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _torchvision_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask, backend=None):
    """torchvision's op as its CUDA autocast rule runs it: in fp32 (it has no bf16 kernels)."""
    dtype = input.dtype
    with torch.autocast(input.device.type, enabled=False):
        args = [t.float() if t is not None else None for t in (input, offset, weight, bias, mask)]
        x, off, w, b, m = args
        return torchvision.ops.deform_conv2d(x, off, w, b, stride, padding, dilation, m).to(dtype)


@contextlib.contextmanager
def _layers_using_torchvision(enabled: bool):
    """Route the DCN layers' calls to torchvision's op while the block runs."""
    if not enabled:
        yield
        return
    ours = deform_conv_layers.deform_conv2d
    deform_conv_layers.deform_conv2d = _torchvision_deform_conv2d
    try:
        yield
    finally:
        deform_conv_layers.deform_conv2d = ours


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
    parser.add_argument(
        "--torchvision", action=argparse.BooleanOptionalAction, default=None,
        help="also time the DCNv2 model on torchvision's op (default: on CUDA only)",
    )  # fmt: skip
    parser.add_argument("--amp", choices=AMP_DTYPES, default="none", help="torch.autocast dtype")
    parser.add_argument("--out", help="markdown file (default benchmarks/results/models_<device>[_<amp>].md)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    height, width = args.size or ((800, 1216) if device.type == "cuda" else (320, 480))
    with_torchvision = args.torchvision if args.torchvision is not None else device.type == "cuda"
    amp_dtype = AMP_DTYPES[args.amp]
    torch.manual_seed(0)
    variants = dict(VARIANTS)
    if with_torchvision:
        variants[TORCHVISION_VARIANT] = VARIANTS["DCNv2 c3-c5"]
    models = {}
    for name, variant in variants.items():
        model = fasterrcnn_resnet50_fpn_dcn(num_classes=91, min_size=height, max_size=width, **variant)
        models[name] = model.to(device)
    images = [torch.rand(3, height, width, device=device) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[40.0, 50.0, 200.0, 220.0], [100, 30, 300, 160]], device=device),
         "labels": torch.tensor([1, 7], device=device)}
        for _ in range(2)
    ]  # fmt: skip

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    def infer(model):
        model.eval()
        with torch.no_grad(), autocast():
            model(images[:1])

    def train_step(model):
        model.train()
        with autocast():
            losses = model(images, targets)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)

    def run(key):
        fn, model = cases[key]
        with _layers_using_torchvision(key[0] == TORCHVISION_VARIANT):
            fn(model)

    cases = {
        (name, kind): (fn, model)
        for name, model in models.items()
        for kind, fn in (("infer", infer), ("train", train_step))
    }
    times = {key: [] for key in cases}
    peaks = {}
    for key in cases:
        run(key)  # warm-up (and first-call compilation on CUDA)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            run(key)
            peaks[key] = torch.cuda.max_memory_allocated(device) / 2**30
    for _ in range(args.repeats):
        for key in cases:
            _sync(device)
            start = time.perf_counter()
            run(key)
            _sync(device)
            times[key].append(1000 * (time.perf_counter() - start))
    median = {key: statistics.median(v) for key, v in times.items()}
    lines = [
        f"# Faster R-CNN R50-FPN: regular vs DCNv2 ({device.type})",
        "",
        f"- machine: {machine_description(device)}; torch {torch.__version__}; "
        f"date {datetime.date.today().isoformat()}",
        f"- images {height}x{width}; inference batch 1, training step batch 2; "
        f"medians of {args.repeats} interleaved runs; autocast: {args.amp}",
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
    suffix = "" if amp_dtype is None else f"_{args.amp}"
    publish(text, args.out or f"benchmarks/results/models_{device.type}{suffix}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
