"""``deformable analyze``: draw the support figure of one or more checkpoints on an image.

Example (a regular, a DCNv1 and a DCNv2 Faster R-CNN, a node on an object and one on the background, and
the RoI head for a box)::

    deformable analyze --model fasterrcnn_resnet50_fpn_dcn --num-classes 11 --backbone resnet18 \\
        --checkpoint regular.pth dcnv1.pth dcnv2.pth --dcn none v1 v2 --labels regular DCNv1 DCNv2 \\
        --image street.png --out figure1.png --fg 120 200 --bg 20 20 --box 150 80 260 170

Files written by ``deformable train`` or ``deformable demo`` (``model_final.pth``, ``checkpoint_last.pth``)
carry their config: their model is built from it, and the model options are not needed::

    deformable analyze --checkpoint runs/regular/model_final.pth runs/dcnv2/model_final.pth \
        --image canvas.png --out figure1.png

Node positions (``--fg``, ``--bg``) are image pixels (y, x), mapped to the nearest position of ``--layer``'s
output map; ``--box`` is (x1, y1, x2, y2) in torchvision's box coordinates (pixel j spans [j, j + 1)).
Errors in the options (a layer or channel that does not exist, a bad box, ...) are messages, not
tracebacks. A checkpoint that fits its model only partly (missing, unexpected or mismatched tensors) is
an error unless ``--allow-partial`` is given. Wire the command into the main parser with
``add_cli(subparsers)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._argtypes import positive_float, positive_int
from .._files import load_weights_only

if TYPE_CHECKING:  # the models are imported when needed (startup time)
    from ..models.checkpoint import Source

__all__ = ["CLASSIFIERS", "DETECTORS", "add_cli", "build_model", "load_image", "run_analyze"]

CLASSIFIERS = (
    "resnet18_dcn",
    "resnet34_dcn",
    "resnet50_dcn",
    "resnet101_dcn",
    "resnext50_32x4d_dcn",
    "resnext101_32x8d_dcn",
)
DETECTORS = (
    "fasterrcnn_resnet50_fpn_dcn",
    "maskrcnn_resnet50_fpn_dcn",
    "fasterrcnn_resnet50_c4_dcn",
    "maskrcnn_resnet50_c4_dcn",
)
_DEFAULT_ROI_POOL = {"none": "align", "v1": "dpool", "v2": "mdpool"}
EXAMPLE = """examples:
  # runs of `deformable train` / `deformable demo` carry their config: no model options needed
  deformable analyze --checkpoint runs/regular/model_final.pth runs/dcnv2/model_final.pth \\
      --image canvas.png --out figure1.png
  # plain state dicts (regular, DCNv1 and DCNv2 detectors; an object node, a background node, a RoI)
  deformable analyze --model fasterrcnn_resnet50_fpn_dcn --num-classes 11 --backbone resnet18 \\
      --checkpoint regular.pth dcnv1.pth dcnv2.pth --dcn none v1 v2 --labels regular DCNv1 DCNv2 \\
      --image street.png --out figure1.png --fg 120 200 --bg 20 20 --box 150 80 260 170
"""


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``analyze`` sub-command (handler in ``func``) to an ``argparse`` sub-parsers object."""
    parser = subparsers.add_parser(
        "analyze",
        help="effective receptive fields, sampling locations and saliency regions of checkpoints",
        description=(
            "Draw the DCNv2 paper's Figure 1/2 layout: for every checkpoint (one row each) and every node "
            "(a foreground point, a background point, optionally a RoI box), the effective receptive "
            "field, the effective sampling/bin locations and the error-bounded saliency region."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="PATH", help="one file per row")
    parser.add_argument(
        "--model", choices=CLASSIFIERS + DETECTORS,
        help="builder in deformable.models, for checkpoints without a training config (plain state dicts)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-partial", action="store_true",
        help="accept checkpoints that fit the model only partly (the counts are printed)",
    )  # fmt: skip
    parser.add_argument(
        "--dcn", nargs="+", default=["v2"], choices=["none", "v1", "v2"],
        help="DCN version of each checkpoint's model (one value, or one per checkpoint; default v2)",
    )  # fmt: skip
    parser.add_argument(
        "--dcn-stages", nargs="+", type=int, default=None,
        help="paper stages with DCN (default: the builder's, 3 4 5; 5 for detectors with --dcn v1)",
    )  # fmt: skip
    parser.add_argument(
        "--roi-pool", nargs="+", choices=["align", "dpool", "mdpool"],
        help="detectors' RoI pooling per checkpoint (default: align / dpool / mdpool for none / v1 / v2)",
    )  # fmt: skip
    parser.add_argument("--backbone", default="resnet50", help="detectors: backbone (default resnet50)")
    parser.add_argument(
        "--num-classes", type=positive_int, help="classes incl. background (default 91 / 1000)"
    )
    parser.add_argument(
        "--min-size", type=positive_int, help="detectors: transform min_size (default torchvision's)"
    )
    parser.add_argument(
        "--max-size", type=positive_int, help="detectors: transform max_size (default torchvision's)"
    )
    parser.add_argument(
        "--source", default="deformable", choices=["deformable", "torchvision", "mmdet", "detectron2"],
        help="who wrote the checkpoints (key renaming; default deformable)",
    )  # fmt: skip
    parser.add_argument("--labels", nargs="+", help="row labels (default: the checkpoints' file names)")
    parser.add_argument("--image", required=True, help="PNG or JPEG image")
    parser.add_argument("--out", required=True, help="the figure to write (PNG)")
    parser.add_argument(
        "--layer", help="module whose output positions are the nodes (default layer4 / backbone.body.layer4)"
    )
    parser.add_argument(
        "--channel", type=int,
        help="node channel (default: all channels; the gradients are those of their sum)",
    )  # fmt: skip
    parser.add_argument(
        "--fg", nargs=2, type=float, metavar=("Y", "X"), help="foreground node, image pixels (default centre)"
    )
    parser.add_argument(
        "--bg",
        nargs=2,
        type=float,
        metavar=("Y", "X"),
        help="background node, image pixels (default H/8, W/8)",
    )
    parser.add_argument(
        "--box", nargs=4, type=float, metavar=("X1", "Y1", "X2", "Y2"),
        help="detectors: add a RoI node (torchvision box coordinates: pixel j spans [j, j + 1))",
    )  # fmt: skip
    parser.add_argument("--class", dest="roi_class", type=int, help="RoI node class (default: best)")
    parser.add_argument(
        "--weighting", default="location", choices=["location", "value", "contribution"],
        help="weight of the sampling locations: the gradient w.r.t. the location (default, per image "
        "pixel), w.r.t. the sampled value, or the sample's contribution",
    )  # fmt: skip
    parser.add_argument(
        "--error-bound", type=positive_float, default=0.1, help="saliency error bound (default 0.1)"
    )
    parser.add_argument(
        "--block-size", type=positive_int, help="saliency search block, pixels (default max(H,W)/16)"
    )
    parser.add_argument("--fill", default="mean", help="masked pixels: mean, zero or a number (default mean)")
    parser.add_argument("--no-saliency", action="store_true", help="skip the saliency search")
    parser.add_argument(
        "--max-points", type=positive_int, default=2000, help="sampling points drawn per panel"
    )
    parser.add_argument(
        "--normalize", default="auto", choices=["auto", "imagenet", "none"],
        help="input normalisation (auto: ImageNet for classifiers; detectors normalise themselves)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dpi", type=positive_int, default=100, help="figure resolution (default 100)")
    parser.set_defaults(func=run_analyze)
    return parser


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as ``[3, H, W]`` float32 RGB in [0, 1] (read by matplotlib: PNG natively, JPEG and
    others through Pillow); grey images are repeated to 3 channels, alpha is dropped."""
    try:
        from matplotlib.image import imread
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("deformable analyze needs matplotlib: pip install matplotlib") from error

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    pixels = torch.from_numpy(imread(str(path)).copy())
    if not pixels.is_floating_point():
        pixels = pixels.float() / 255
    if pixels.dim() == 2:
        pixels = pixels[..., None].expand(-1, -1, 3)
    if pixels.dim() != 3 or pixels.shape[-1] not in (1, 3, 4):
        raise ValueError(f"cannot read {path} as an RGB image (array shape {list(pixels.shape)})")
    pixels = pixels[..., :3] if pixels.shape[-1] != 1 else pixels.expand(-1, -1, 3)
    return pixels.permute(2, 0, 1).float().contiguous()


def build_model(
    name: str,
    *,
    dcn: str | None = "v2",
    dcn_stages: Sequence[int] | None = None,
    roi_pool: str | None = None,
    backbone: str = "resnet50",
    num_classes: int | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
) -> torch.nn.Module:
    """A model from :mod:`deformable.models` by builder name, with the options of ``deformable analyze``.

    ``dcn`` is ``"v1"``, ``"v2"`` or None/"none"; ``dcn_stages`` defaults to the builder's (conv3-5;
    conv5 for a DCNv1 detector); ``roi_pool`` (detectors) defaults to align / dpool / mdpool for none /
    v1 / v2.
    """
    from .. import models

    dcn = None if dcn in (None, "none") else dcn
    stages = {} if dcn_stages is None else {"dcn_stages": tuple(dcn_stages)}
    if name in CLASSIFIERS:
        kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
        return getattr(models, name)(dcn=dcn, **stages, **kwargs)
    if name in DETECTORS:
        kwargs = {"num_classes": 91 if num_classes is None else num_classes, "backbone": backbone}
        kwargs["roi_pool"] = roi_pool or _DEFAULT_ROI_POOL[dcn or "none"]
        if min_size is not None:
            kwargs["min_size"] = min_size
        if max_size is not None:
            kwargs["max_size"] = max_size
        return getattr(models, name)(dcn=dcn, **stages, **kwargs)
    raise ValueError(f"model must be one of {CLASSIFIERS + DETECTORS}, got {name!r}")


def _per_checkpoint(values, count: int, option: str) -> list:
    if values is None:
        return [None] * count
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        raise SystemExit(f"{option} takes one value or one per checkpoint ({count}), got {len(values)}")
    return list(values)


def _fill(text: str):
    if text in ("mean", "zero"):
        return text
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"--fill must be mean, zero or a number, got {text!r}") from None


def _trained_model(path: str) -> tuple[torch.nn.Module, bool, str] | None:
    """(model, is_detector, architecture) of a file written by ``deformable train`` / ``demo``, built from
    the config it carries (architecture: the classifier's ``arch``, or the detector's ``model`` and
    ``backbone``); None for a file without one (a plain state dict)."""
    from ..engine.classifier import load_trained_classifier
    from ..engine.config import ClassifierConfig, config_from_dict
    from ..engine.trainer import load_trained_model

    try:
        data = load_weights_only(path, "checkpoint")
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--checkpoint: {error}") from None
    if not (isinstance(data, dict) and isinstance(data.get("config"), dict) and "model" in data):
        return None
    cfg = config_from_dict(data["config"])
    if isinstance(cfg, ClassifierConfig):
        return load_trained_classifier(data, cfg), False, cfg.arch
    return load_trained_model(data, cfg), True, _architecture(cfg.model, cfg.backbone, True)


def _architecture(model: str, backbone: str, detector: bool) -> str:
    """The name shown in the figure title: the builder, with the backbone for detectors."""
    return f"{model} ({backbone})" if detector else model


def _load_state_dict(model, path: str, name: str, dcn, source: Source, allow_partial: bool) -> None:
    """Load a plain checkpoint into ``model``; one that fits only partly needs ``allow_partial``."""
    from ..models import load_checkpoint

    report = load_checkpoint(model, path, source=source)
    if not report.loaded:
        raise SystemExit(f"{path}: no tensor of the checkpoint fits {name} (dcn={dcn})")
    if report.missing or report.unexpected or report.mismatched:
        counts = (
            f"{path}: {len(report.loaded)} tensors loaded, {len(report.missing)} missing, "
            f"{len(report.unexpected)} unexpected, {len(report.mismatched)} mismatched"
        )
        if not allow_partial:
            first = [*report.missing, *(key for key, _, _ in report.mismatched), *report.unexpected][:5]
            raise SystemExit(
                f"{counts} (e.g. {', '.join(first)}): the checkpoint does not fit {name} with "
                "these options (--dcn, --backbone, --num-classes, --source); --allow-partial accepts it"
            )
        print(counts)


def run_analyze(args: argparse.Namespace) -> int:
    """The ``analyze`` handler: build, load, analyse, draw; prints the figure's path."""
    from .geometry import image_to_position
    from .plotting import FigureNode, plot_support_figure

    count = len(args.checkpoint)
    dcns = _per_checkpoint(args.dcn, count, "--dcn")
    pools = _per_checkpoint(args.roi_pool, count, "--roi-pool")
    if args.labels and len(args.labels) != count:
        raise SystemExit(f"--labels needs one label per checkpoint ({count}), got {len(args.labels)}")
    labels = args.labels or [Path(p).stem for p in args.checkpoint]
    device = torch.device(args.device)

    rows, kinds, architectures = [], set(), []
    for path, dcn, pool, label in zip(args.checkpoint, dcns, pools, labels, strict=True):
        trained = _trained_model(path)
        if trained is not None:
            model, is_detector, architecture = trained
        else:
            if args.model is None:
                raise SystemExit(
                    f"{path} holds no training config (it was not written by `deformable train`): "
                    "name its architecture with --model (and --dcn, --backbone, --num-classes as needed)"
                )
            try:  # a bad --backbone, --dcn-stages, ...: the builders' ValueErrors name the option
                model = build_model(
                    args.model, dcn=dcn, dcn_stages=args.dcn_stages, roi_pool=pool, backbone=args.backbone,
                    num_classes=args.num_classes, min_size=args.min_size, max_size=args.max_size,
                )  # fmt: skip
            except (TypeError, ValueError) as error:
                raise SystemExit(f"--model {args.model}: {error}") from None
            _load_state_dict(model, path, args.model, dcn, args.source, args.allow_partial)
            is_detector = args.model in DETECTORS
            architecture = _architecture(args.model, args.backbone, is_detector)
        kinds.add(is_detector)
        if architecture not in architectures:
            architectures.append(architecture)
        rows.append((label, model.to(device).eval()))
    if len(kinds) > 1:
        raise SystemExit("--checkpoint files must all be detectors or all classifiers")
    detector = kinds.pop()
    if args.box is not None and not detector:
        raise SystemExit("--box (a RoI node) needs a detector model")

    try:
        shown = load_image(args.image).to(device)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--image: {error}") from None
    image = shown
    if args.normalize == "imagenet" or (args.normalize == "auto" and not detector):
        from ..data.image_folder import IMAGENET_MEAN, IMAGENET_STD

        mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
        image = (shown - mean) / std
    height, width = image.shape[-2:]
    layer = args.layer or ("backbone.body.layer4" if detector else "layer4")
    first = rows[0][1]
    fg = args.fg if args.fg is not None else ((height - 1) / 2, (width - 1) / 2)
    bg = args.bg if args.bg is not None else (height / 8, width / 8)
    fill = _fill(args.fill)
    try:  # the library's ValueErrors name what is wrong (layer, channel, box, ...): a message, no traceback
        nodes = [
            FigureNode("foreground", layer, image_to_position(first, image, layer, fg), args.channel),
            FigureNode("background", layer, image_to_position(first, image, layer, bg), args.channel),
        ]
        if args.box is not None:
            nodes.append(FigureNode("RoI", "roi", tuple(args.box), args.roi_class))
        out = plot_support_figure(
            rows, image, nodes, args.out, display_image=shown, weighting=args.weighting,
            saliency=not args.no_saliency, error_bound=args.error_bound, fill=fill,
            block_size=args.block_size, max_points=args.max_points, dpi=args.dpi,
            title=f"{', '.join(architectures)}: {layer}",
        )  # fmt: skip
    except ValueError as error:
        raise SystemExit(f"deformable analyze: {error}") from None
    print(f"wrote {out}")
    return 0
