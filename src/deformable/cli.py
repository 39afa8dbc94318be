"""The ``deformable`` command line: ``demo | train | eval | analyze | bench | convert | export | info``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

import torch

from ._argtypes import positive_int
from ._files import strict_json

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def _json_object(text: str) -> dict:
    """argparse type: a JSON object (``--model-kwargs``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"invalid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"dcn\": null}}', got {text!r}")
    return value


def _device(text: str) -> torch.device:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:N``, present on this machine."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r} needs CUDA, which is not available here")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    return device


def _builder_names() -> list[str]:
    """The model builders of :mod:`deformable.models`: classifiers (``BACKBONES``), then detectors."""
    from .engine.config import detector_builders
    from .models import BACKBONES

    return [builder.__name__ for builder in BACKBONES.values()] + list(detector_builders())


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
    if triton_available():
        from .ops._triton._autotune_cache import cache_path  # pure Python: Triton is not imported

        if os.environ.get("DEFORMABLE_TRITON_AUTOTUNE", "0") == "1":
            path = cache_path()
            kept = path if path is not None else "memory only"
            print(f"triton autotuning: on (for CUDA tensors), results kept in {kept}")
        else:
            print(
                "triton autotuning: off (heuristic configurations; DEFORMABLE_TRITON_AUTOTUNE=1 turns it on)"
            )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import benchmark
    from .ops._backend import resolve_backend

    device = args.device
    try:
        resolve_backend(args.backend, device)
    except ValueError as error:
        args.parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes: tuple[benchmark.Shape, ...]
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


def demo_rows(text: str) -> list[str]:
    """``--rows``: comma-separated keys of the demo's table rows."""
    from .engine.demo import ROW_KEYS

    rows = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [r for r in rows if r not in ROW_KEYS]
    if unknown or not rows:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated choice of {', '.join(ROW_KEYS)}, got {text!r}"
        )
    return rows


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.task == "classification":
        from .engine.classification import run_classification_demo

        if args.rows is not None:
            args.parser.error("--rows selects detection rows; --task classification has none")
        if args.seeds is not None:
            args.parser.error(
                "--seeds repeats detection rows; --task classification runs seed 0 (--set seed=N)"
            )
        run_classification_demo(args.preset, args.out, args.set, resume=not args.restart)
        return 0
    from .engine.demo import run_demo

    run_demo(args.preset, args.out, args.set, resume=not args.restart, seeds=args.seeds, rows=args.rows)
    return 0


def _config(args: argparse.Namespace, overrides: list[str] | None, stored: dict | None = None):
    """``--config`` (or else ``stored``, a checkpoint's config) with ``overrides`` applied; a missing
    file or a bad value is a usage error."""
    from .engine.config import config_from_dict, load_any_config, parse_overrides

    try:
        if args.config or stored is None:
            return load_any_config(args.config, overrides)
        return config_from_dict({**stored, **parse_overrides(overrides)})
    except (FileNotFoundError, ValueError) as error:
        args.parser.error(str(error))


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine.config import ClassifierConfig

    overrides = list(args.set or [])
    if args.out:
        # quoted, so that a name such as 2024 or true stays a string when read as YAML
        overrides.append(f"out_dir={json.dumps(args.out)}")
    cfg = _config(args, overrides)
    if isinstance(cfg, ClassifierConfig):
        from .engine.classifier import train_classifier

        metrics = train_classifier(cfg, resume=args.resume, evaluate_at_end=not args.no_eval).metrics
    else:
        from .engine.trainer import train

        metrics = train(cfg, resume=args.resume, evaluate_at_end=not args.no_eval).metrics
    if metrics:
        print(strict_json(metrics))
    return 0


def _read_checkpoint(args: argparse.Namespace) -> dict:
    """The ``--checkpoint`` file's contents, or a usage error saying why it cannot be read."""
    from .engine.loop import read_model_file

    parser: argparse.ArgumentParser = args.parser  # its error() exits
    path = Path(args.checkpoint)
    try:
        return read_model_file(path)
    except FileNotFoundError:
        parser.error(f"--checkpoint {path}: no such file")
    except ValueError as error:
        parser.error(f"--checkpoint {path} is not a model file of deformable train/convert: {error}")


def _trained_model(args: argparse.Namespace, load, data: dict, cfg):
    """``load(data, cfg)`` (``data``: what --checkpoint holds); a model the config cannot build, or one
    the file's tensors do not fit (a missing key, a shape), is a usage error."""
    try:
        return load(data, cfg)
    except (KeyError, RuntimeError, ValueError) as error:
        detail = textwrap.shorten(f"{type(error).__name__}: {error}", 600)  # torch lists every key
        args.parser.error(f"cannot load --checkpoint {args.checkpoint} into the config's model ({detail})")


def _cmd_eval(args: argparse.Namespace) -> int:
    from .engine.config import ClassifierConfig
    from .engine.loop import device_for

    data = _read_checkpoint(args)
    stored = data.get("config")
    if not args.config and not isinstance(stored, dict):
        args.parser.error(
            f"--checkpoint {args.checkpoint} holds no training config (a file of `deformable convert` or a "
            "plain state dict): pass --config"
        )
    cfg = _config(args, args.set, stored)
    device = device_for(cfg)
    if isinstance(cfg, ClassifierConfig):
        from .engine.classifier import (
            build_classification_val_dataset,
            evaluate_classifier,
            load_trained_classifier,
        )

        model = _trained_model(args, load_trained_classifier, data, cfg)
        val = _val_dataset(args, build_classification_val_dataset, cfg)  # the training set may be gone
        _check_classes(args, data["model"]["fc.weight"].shape[0], len(val.classes), "classes")
        metrics = evaluate_classifier(model.to(device), val, cfg, device)
    else:
        from .engine.trainer import build_val_dataset, evaluate, load_trained_model, training_categories

        model = _trained_model(args, load_trained_model, data, cfg)
        # Labelled as training did: the categories the model file holds, else the training annotations'.
        found = _val_dataset(args, training_categories, cfg, data.get("categories"))
        val = _val_dataset(args, build_val_dataset, cfg, *(found or ()))
        classes = data["model"]["roi_heads.box_predictor.cls_score.weight"].shape[0]
        _check_classes(args, classes, val.num_classes + 1, "classes (with background)")
        metrics = evaluate(model.to(device), val, cfg, device)
    print(strict_json(metrics))
    return 0


def _val_dataset(args: argparse.Namespace, build, *arguments):
    """``build(*arguments)`` (what the validation set needs); a missing file or a bad annotation or
    category is a usage error."""
    try:
        return build(*arguments)
    except (FileNotFoundError, ValueError) as error:
        args.parser.error(f"cannot build the validation set of the config: {error}")


def _check_classes(args: argparse.Namespace, model_classes: int, data_classes: int, what: str) -> None:
    """A usage error when the model and the validation set count different classes: its labels could
    not be the validation set's."""
    if model_classes != data_classes:
        args.parser.error(
            f"--checkpoint {args.checkpoint} scores {model_classes} {what} but the validation set has "
            f"{data_classes}: its labels cannot be the validation set's (pass the training config's data)"
        )


def _cmd_convert(args: argparse.Namespace) -> int:
    from . import models
    from .engine.checkpointing import atomic_save

    try:
        state = models.read_state_dict(args.input)
    except (FileNotFoundError, ValueError) as error:
        args.parser.error(f"--input: {error}")
    kwargs = dict(args.model_kwargs or {})
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    try:
        model = getattr(models, args.model)(**kwargs)
    except (TypeError, ValueError) as error:
        args.parser.error(f"cannot build {args.model} with {kwargs} (--model-kwargs, --num-classes): {error}")
    report = models.load_checkpoint(model, state, source=args.source)
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
        type=positive_int,
        default=None,
        help="detection: run seeds 0..N-1 of every row, table as mean +- std (default: smoke 1, default 1, "
        "full 3)",
    )
    demo.add_argument(
        "--rows",
        type=demo_rows,
        default=None,
        metavar="ROW[,ROW...]",
        help="detection: run only these rows of the table (regular, dcnv1, dcnv2, mimic; default: all)",
    )
    demo.add_argument("--task", default="detection", choices=["detection", "classification"])
    demo.add_argument("--out", default="demo_out", help="report folder (default: demo_out)")
    demo.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    demo.add_argument(
        "--restart", action="store_true", help="ignore checkpoints of an interrupted earlier run"
    )
    demo.set_defaults(func=_cmd_demo, parser=demo)

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
    train.set_defaults(func=_cmd_train, parser=train)

    evaluate = sub.add_parser(
        "eval", help="COCO AP of a trained detector, or top-1/top-5 error of a trained classifier"
    )
    evaluate.add_argument("--checkpoint", required=True, help="model_final.pth or checkpoint_last.pth")
    evaluate.add_argument("--config", help="config (default: the one stored in the checkpoint)")
    evaluate.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    evaluate.set_defaults(func=_cmd_eval, parser=evaluate)

    convert = sub.add_parser("convert", help="import a torchvision/mmdet/detectron2 checkpoint")
    convert.add_argument("--input", required=True, help=".pth/.pt/.safetensors file")
    convert.add_argument(
        "--source", required=True, choices=["deformable", "torchvision", "mmdet", "detectron2"]
    )
    convert.add_argument(
        "--model", required=True, choices=_builder_names(), metavar="BUILDER",
        help="builder in deformable.models: %(choices)s",
    )  # fmt: skip
    convert.add_argument("--num-classes", type=positive_int, help="classes including background")
    convert.add_argument(
        "--model-kwargs", type=_json_object,
        help='JSON object of further builder arguments, e.g. \'{"dcn": "v2"}\'',
    )  # fmt: skip
    convert.add_argument("--out", required=True, help="where to write the converted state dict")
    convert.set_defaults(func=_cmd_convert, parser=convert)

    bench = sub.add_parser("bench", help="time deform_conv2d against F.conv2d and torchvision")
    bench.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    bench.add_argument(
        "--dtypes", nargs="+", choices=sorted(DTYPES), help="default: fp32 on CPU, all on CUDA"
    )
    bench.add_argument("--repeats", type=positive_int, default=7, help="interleaved repetitions (default: 7)")
    bench.add_argument("--threads", type=positive_int, help="torch.set_num_threads for CPU runs")
    bench.add_argument("--backend", choices=["reference", "aten", "triton"], help="default: automatic")
    bench.add_argument("--small", action="store_true", help="one small shape, for a quick check")
    bench.add_argument("--out", help="write the markdown table here (e.g. benchmarks/results/ops_cpu.md)")
    bench.set_defaults(func=_cmd_bench, parser=bench)

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
