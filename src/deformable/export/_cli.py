"""The ``deformable export`` subcommand: a built-in model (optionally with a checkpoint) to ONNX."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from .._argtypes import positive_int
from ._common import MIN_OPSET


def _dcnv2_layer_demo() -> tuple[nn.Module, tuple[int, ...]]:
    """The layer of ``deformable demo``: DCNv2(16 -> 32, 3x3, padding 1) on [N, 16, 20, 20]."""
    from ..nn import DCNv2

    torch.manual_seed(0)
    return DCNv2(16, 32, 3, padding=1), (16, 20, 20)


def _resnet50_dcn() -> tuple[nn.Module, tuple[int, ...]]:
    """ResNet-50 with DCNv2 in conv3-conv5 (``deformable.models.resnet50_dcn``) on [N, 3, 224, 224]."""
    from ..models import resnet50_dcn

    return resnet50_dcn(), (3, 224, 224)


#: --model choices: name -> builder returning (model, input shape without the batch axis)
MODELS = {"dcnv2-layer-demo": _dcnv2_layer_demo, "resnet50_dcn": _resnet50_dcn}


def _load_state_dict(path: Path) -> dict:
    """The model's state dict from ``path`` (a plain state dict, a training checkpoint or safetensors).

    Raises FileNotFoundError or ValueError (unreadable, or no tensors), naming the file."""
    from ..models.checkpoint import read_state_dict

    return read_state_dict(path)


def _cmd_export(args: argparse.Namespace) -> int:
    from . import export_onnx

    try:
        if args.checkpoint is None and args.model != "dcnv2-layer-demo":
            raise ValueError(f"--model {args.model} needs --checkpoint (its weights)")
        model, shape = MODELS[args.model]()
        if args.checkpoint is not None:
            model.load_state_dict(_load_state_dict(Path(args.checkpoint)))
        size = args.input_size or list(shape[1:])
        example = torch.randn(args.batch_size, shape[0], *size)
        out = export_onnx(
            model, example, args.out, opset=args.opset, dynamic_batch=not args.static_batch,
            dynamo=args.exporter == "dynamo",
        )  # fmt: skip
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, ImportError) as error:
        print(f"deformable export: error: {error}", file=sys.stderr)
        return 2
    weights = args.checkpoint or "freshly initialised weights (seed 0)"
    print(f"wrote {out} ({args.model}, {weights}, opset {args.opset}, input {tuple(example.shape)})")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser = subparsers.add_parser(
        "export",
        help="export a built-in model to ONNX (DeformConv, opset 19+)",
        description="Export a built-in model, with the weights of a state-dict checkpoint, to ONNX.",
    )
    parser.add_argument("--model", required=True, choices=sorted(MODELS), help="the built-in model")
    parser.add_argument(
        "--checkpoint", help="state dict saved with torch.save(model.state_dict(), PATH) (or {'model': ...})"
    )
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--opset", type=positive_int, default=MIN_OPSET, help=f"ai.onnx opset (default {MIN_OPSET})"
    )
    parser.add_argument("--batch-size", type=positive_int, default=2, help="example batch size (default 2)")
    parser.add_argument(
        "--input-size",
        type=positive_int,
        nargs=2,
        metavar=("H", "W"),
        help="example image size (model default)",
    )
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size (default: dynamic)")
    parser.add_argument(
        "--exporter", choices=["dynamo", "torchscript"], default="dynamo",
        help="torch.onnx exporter (default: dynamo, PyTorch's recommendation)",
    )  # fmt: skip
    parser.set_defaults(func=_cmd_export)
    return parser
