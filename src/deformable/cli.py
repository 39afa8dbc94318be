"""The ``deformable`` command line: ``demo | train | eval | analyze | bench | convert | export | info``."""

from __future__ import annotations

import argparse
import json
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
    if args.task == "classification":
        from .engine.classification import run_classification_demo

        run_classification_demo(args.preset, args.out, args.set, resume=not args.restart)
        return 0
    from .engine.demo import run_demo

    run_demo(args.preset, args.out, args.set, resume=not args.restart, seeds=args.seeds)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine.config import ClassifierConfig, load_any_config

    overrides = list(args.set or [])
    if args.out:
        overrides.append(f"out_dir={args.out}")
    cfg = load_any_config(args.config, overrides)
    if isinstance(cfg, ClassifierConfig):
        from .engine.classifier import train_classifier

        result = train_classifier(cfg, resume=args.resume, evaluate_at_end=not args.no_eval)
    else:
        from .engine.trainer import train

        result = train(cfg, resume=args.resume, evaluate_at_end=not args.no_eval)
    if result.metrics:
        print(json.dumps(result.metrics, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .engine.config import ClassifierConfig, config_from_dict, load_any_config, parse_overrides
    from .engine.loop import device_for

    data = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    if args.config:
        cfg = load_any_config(args.config, args.set)
    else:
        cfg = config_from_dict({**data["config"], **parse_overrides(args.set)})
    device = device_for(cfg)
    if isinstance(cfg, ClassifierConfig):
        from .engine.classifier import (
            build_classification_datasets,
            evaluate_classifier,
            load_trained_classifier,
        )

        model = load_trained_classifier(args.checkpoint, cfg)
        _, val, _ = build_classification_datasets(cfg)
        metrics = evaluate_classifier(model.to(device), val, cfg, device)
    else:
        from .engine.trainer import build_datasets, evaluate, load_trained_model

        model = load_trained_model(args.checkpoint, cfg)
        _, val = build_datasets(cfg)
        metrics = evaluate(model.to(device), val, cfg, device)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from . import models
    from .engine.checkpointing import atomic_save

    builder = getattr(models, args.model, None)
    if builder is None:
        raise SystemExit(f"--model must name a builder in deformable.models, got {args.model!r}")
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    model = builder(**kwargs)
    report = models.load_checkpoint(model, args.input, source=args.source)
    print(report)
    atomic_save(
        {"model": model.state_dict(), "source": args.source, "builder": args.model, "kwargs": kwargs},
        args.out,
    )
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deformable", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="the main job: the paper's ablation (Table 1) on the embedded dataset, with a report"
    )
    demo.add_argument(
        "--preset",
        default="default",
        choices=["smoke", "default", "full"],
        help="smoke: the whole path in minutes; default: ~20 min on a 2-core CPU; full: GPU, 3 seeds",
    )
    demo.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="detection: run seeds 0..N-1 of every row, table as mean +- std (default: smoke 1, default 1, "
        "full 3)",
    )
    demo.add_argument("--task", default="detection", choices=["detection", "classification"])
    demo.add_argument("--out", default="demo_out", help="report folder (default: demo_out)")
    demo.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    demo.add_argument(
        "--restart", action="store_true", help="ignore checkpoints of an interrupted earlier run"
    )
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser(
        "train", help="train a detector, or a classifier (a config with task: classification), from a config"
    )
    train.add_argument("--config", required=True, help="a YAML file or the name of one in deformable/configs")
    train.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    train.add_argument("--out", help="run folder (overrides out_dir)")
    train.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    train.add_argument(
        "--no-eval", action="store_true", help="skip the final evaluation (COCO AP, or top-1/top-5 error)"
    )
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser(
        "eval", help="COCO AP of a trained detector, or top-1/top-5 error of a trained classifier"
    )
    evaluate.add_argument("--checkpoint", required=True, help="model_final.pth or checkpoint_last.pth")
    evaluate.add_argument("--config", help="config (default: the one stored in the checkpoint)")
    evaluate.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    evaluate.set_defaults(func=_cmd_eval)

    convert = sub.add_parser("convert", help="import a torchvision/mmdet/detectron2 checkpoint")
    convert.add_argument("--input", required=True, help=".pth/.pt/.safetensors file")
    convert.add_argument(
        "--source", required=True, choices=["deformable", "torchvision", "mmdet", "detectron2"]
    )
    convert.add_argument("--model", required=True, help="builder name, e.g. maskrcnn_resnet50_fpn_dcn")
    convert.add_argument("--num-classes", type=int, help="classes including background")
    convert.add_argument("--model-kwargs", help='JSON of further builder arguments, e.g. \'{"dcn": "v2"}\'')
    convert.add_argument("--out", required=True, help="where to write the converted state dict")
    convert.set_defaults(func=_cmd_convert)

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

    from .analysis import add_cli as add_analyze_cli
    from .export import add_cli as add_export_cli

    add_export_cli(sub)
    add_analyze_cli(sub)

    info = sub.add_parser("info", help="versions, devices and backends")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
