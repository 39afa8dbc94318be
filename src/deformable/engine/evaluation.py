"""COCO-style evaluation of detections (bbox) and instance masks (segm) with pycocotools.

- :func:`coco_evaluate` scores COCO-format results against a ``pycocotools.coco.COCO`` ground truth and
  returns AP, AP50, AP75, APs, APm, APl (and the six AR numbers) per IoU type.
- :func:`detections_to_coco` turns torchvision detection outputs (boxes xyxy, contiguous labels,
  scores, mask probabilities [K, 1, H, W]) into COCO results (category ids, xywh boxes, RLE masks).
- :class:`Evaluator` accumulates a loop's outputs and, under torch.distributed, gathers every rank's
  results before scoring.

Metrics are fractions in [0, 1]; a metric that is undefined (no ground truth in that size range) is NaN
where pycocotools prints -1.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..data._checks import is_number
from ..data.coco import _check_rle

__all__ = ["METRIC_NAMES", "Evaluator", "coco_evaluate", "detections_to_coco"]

#: Names of COCOeval.stats entries, in order.
METRIC_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
_RESULT_KEY = {"bbox": "bbox", "segm": "segmentation"}


def _results_coco(coco_gt: COCO, anns: Sequence[Mapping[str, Any]], iou_type: str) -> COCO:
    """Build the results COCO object (what ``COCO.loadRes`` does, without printing or mutating input)."""
    out = []
    for i, p in enumerate(anns):
        ann = {
            "id": i + 1,
            "image_id": p["image_id"],
            "category_id": p["category_id"],
            "score": float(p["score"]),
        }
        ann["iscrowd"] = 0
        if iou_type == "bbox":
            x, y, w, h = (float(v) for v in p["bbox"])
            ann["bbox"] = [x, y, w, h]
            ann["area"] = w * h
        else:
            rle = p["segmentation"]
            if isinstance(rle["counts"], list):  # uncompressed: pycocotools' area/toBbox need it compressed
                rle = mask_utils.frPyObjects(rle, *rle["size"])
            ann["segmentation"] = rle
            ann["area"] = float(mask_utils.area(rle))
            ann["bbox"] = mask_utils.toBbox(rle).tolist()
        out.append(ann)
    res = COCO()
    res.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": out,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def coco_evaluate(
    coco_gt: COCO,
    predictions: Sequence[Mapping[str, Any]],
    iou_types: Iterable[str] = ("bbox", "segm"),
    *,
    img_ids: Iterable[int] | None = None,
    verbose: bool = False,
) -> dict[str, dict[str, float]]:
    """Score COCO-format results with pycocotools' COCOeval.

    Args:
        coco_gt: the ground truth (e.g. ``CocoDetection.coco``).
        predictions: dicts with ``image_id``, ``category_id`` (the json's ids), ``score`` and, per IoU type,
            ``bbox`` ([x, y, w, h], pixels) and/or ``segmentation`` (RLE with ``size`` and ``counts``).
            Each IoU type uses the predictions that carry its field.
        iou_types: any of ``"bbox"``, ``"segm"``.
        img_ids: restrict scoring to these images (default: every ground-truth image, so an image with
            no prediction counts its objects as missed).
        verbose: print pycocotools' progress and summary table.

    Returns:
        ``{iou_type: {"AP": ..., "AP50": ..., "AP75": ..., "APs": ..., "APm": ..., "APl": ..., "AR1": ...,
        "AR10": ..., "AR100": ..., "ARs": ..., "ARm": ..., "ARl": ...}}``; NaN where undefined.
    """
    _check_coco(coco_gt)
    iou_types = _check_iou_types(iou_types)
    known_images = set(coco_gt.getImgIds())
    known_cats = set(coco_gt.getCatIds())
    for i, p in enumerate(predictions):
        _check_prediction(coco_gt, p, i, known_images, known_cats)
    if img_ids is not None:
        if isinstance(img_ids, str | bytes) or not isinstance(img_ids, Iterable):
            raise TypeError(f"img_ids must be None or an iterable of image ids, got {img_ids!r}")
        img_ids = list(img_ids)
        if not all(isinstance(i, Hashable) for i in img_ids):
            raise ValueError(f"img_ids must hold image ids, got {img_ids[:10]!r}")
        img_ids = sorted(set(img_ids))
        unknown = [i for i in img_ids if i not in known_images]
        if unknown:
            raise ValueError(f"img_ids holds ids that are not in the ground truth: {unknown[:10]}")

    metrics: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        key = _RESULT_KEY[iou_type]
        if iou_type == "segm":
            lacking = [a["id"] for a in coco_gt.dataset.get("annotations", []) if not a.get("segmentation")]
            if lacking:
                raise ValueError(
                    f"iou_type 'segm' needs a 'segmentation' on every ground-truth annotation; "
                    f"{len(lacking)} lack one (ids {lacking[:5]})"
                )
        anns = [p for p in predictions if key in p]
        if predictions and not anns:
            raise ValueError(f"iou_type {iou_type!r} needs predictions with {key!r}; none has it")
        coco_dt = _results_coco(coco_gt, anns, iou_type)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if img_ids is not None:
            evaluator.params.imgIds = img_ids
        sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with sink:
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics[iou_type] = {
            name: (float(v) if v >= 0 else math.nan)
            for name, v in zip(METRIC_NAMES, evaluator.stats, strict=True)
        }
    return metrics


def _check_coco(coco_gt: Any) -> None:
    if not isinstance(coco_gt, COCO):
        raise TypeError(
            f"coco_gt must be a pycocotools.coco.COCO (e.g. CocoDetection.coco), got {type(coco_gt).__name__}"
        )


def _check_iou_types(iou_types: Iterable[str]) -> tuple[str, ...]:
    if isinstance(iou_types, str):
        raise TypeError(f"iou_types must be a sequence such as ('bbox',), got the string {iou_types!r}")
    iou_types = tuple(iou_types)
    for t in iou_types:
        if t not in _RESULT_KEY:
            raise ValueError(f"iou_types entries must be 'bbox' or 'segm', got {t!r}")
    return iou_types


def _check_prediction(coco_gt: COCO, p: Any, i: int, known_images: set, known_cats: set) -> None:
    """Raise a ValueError naming ``predictions[i]`` and the field that pycocotools would choke on."""
    if not isinstance(p, Mapping):
        raise ValueError(f"predictions[{i}] must be a dict, got {type(p).__name__}")
    for field in ("image_id", "category_id", "score"):
        if field not in p:
            raise ValueError(f"predictions[{i}] lacks {field!r}")
    if not isinstance(p["image_id"], Hashable) or p["image_id"] not in known_images:
        raise ValueError(f"predictions[{i}]: image_id {p['image_id']!r} is not in the ground truth")
    if not isinstance(p["category_id"], Hashable) or p["category_id"] not in known_cats:
        raise ValueError(f"predictions[{i}]: category_id {p['category_id']!r} is not in the ground truth")
    if not _finite(p["score"]):
        raise ValueError(f"predictions[{i}]: 'score' must be a finite number, got {p['score']!r}")
    if "bbox" in p:
        bbox = p["bbox"]
        bbox = list(bbox) if isinstance(bbox, Iterable) and not isinstance(bbox, str | bytes) else None
        if bbox is None or len(bbox) != 4 or not all(_finite(v) for v in bbox):
            raise ValueError(
                f"predictions[{i}]: 'bbox' must be [x, y, w, h] of finite numbers, got {p['bbox']!r}"
            )
    if "segmentation" in p:
        segm = p["segmentation"]
        info = coco_gt.imgs[p["image_id"]]
        problem = (
            _check_rle(segm, info["height"], info["width"])
            if isinstance(segm, dict)
            else f"'segmentation' must be an RLE dict with 'size' and 'counts', got {type(segm).__name__}"
        )
        if problem:
            raise ValueError(f"predictions[{i}] (image_id {p['image_id']}): {problem}")


def _finite(value: Any) -> bool:
    """A finite number as ``float()`` reads it (Python, numpy and 0-d torch scalars), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, RuntimeError):
        return False


def _cat_id(label_to_cat_id: Mapping[int, int] | Sequence[int], label: int) -> int:
    try:
        return int(label_to_cat_id[label])
    except (KeyError, IndexError):
        raise ValueError(f"label {label} has no category id in label_to_cat_id") from None


def detections_to_coco(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int] | Sequence[int],
    *,
    image_sizes: Sequence[Sequence[int]] | None = None,
    orig_sizes: Sequence[Sequence[int]] | None = None,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Convert torchvision detection outputs to COCO results.

    Args:
        outputs: one dict per image with ``boxes`` [K, 4] (x1, y1, x2, y2), ``labels`` [K] (contiguous),
            ``scores`` [K] and optionally ``masks`` [K, 1, H, W] (probabilities).
        image_ids: the COCO image id of each output.
        label_to_cat_id: contiguous label -> COCO category id (e.g. ``CocoDetection.label_to_cat_id``).
        image_sizes / orig_sizes: (H, W) the outputs refer to and (H, W) of the original image, per image;
            when they differ, boxes are rescaled and masks resized (bilinear) to the original size.
        mask_threshold: a mask pixel belongs to the object where its probability is > this.

    Returns:
        One dict per detection: ``image_id``, ``category_id``, ``score``, ``bbox`` [x, y, w, h] and, when
        masks are given, ``segmentation`` (compressed RLE, ``counts`` as str).
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"outputs and image_ids differ in length: {len(outputs)} vs {len(image_ids)}")
    for name, sizes in (("image_sizes", image_sizes), ("orig_sizes", orig_sizes)):
        if sizes is not None and len(sizes) != len(outputs):
            raise ValueError(f"{name} has {len(sizes)} entries for {len(outputs)} outputs")
    if not is_number(mask_threshold):
        raise ValueError(f"mask_threshold must be a finite number, got {mask_threshold!r}")
    results: list[dict[str, Any]] = []
    for n, (out, image_id) in enumerate(zip(outputs, image_ids, strict=True)):
        for field in ("boxes", "labels", "scores"):
            if field not in out:
                raise ValueError(f"outputs[{n}] lacks {field!r}")
        for field in ("boxes", "labels", "scores", "masks"):
            if field in out and not isinstance(out[field], torch.Tensor):
                raise TypeError(f"outputs[{n}][{field!r}] must be a Tensor, got {type(out[field]).__name__}")
        if out["boxes"].numel() % 4:
            raise ValueError(f"outputs[{n}]: 'boxes' must be [K, 4], got {tuple(out['boxes'].shape)}")
        boxes = out["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4).clone()
        labels = out["labels"].detach().cpu().reshape(-1).tolist()
        scores = out["scores"].detach().cpu().reshape(-1).tolist()
        if not len(labels) == len(scores) == boxes.shape[0]:
            raise ValueError(
                f"outputs[{n}]: boxes, labels and scores differ in length "
                f"({boxes.shape[0]}, {len(labels)}, {len(scores)})"
            )
        masks = out.get("masks")
        in_hw: tuple[int, ...] | None = (
            _height_width(image_sizes[n], f"image_sizes[{n}]") if image_sizes is not None else None
        )
        orig_hw = _height_width(orig_sizes[n], f"orig_sizes[{n}]") if orig_sizes is not None else None
        if in_hw is None and masks is not None:
            in_hw = tuple(masks.shape[-2:])
        if orig_hw is not None and in_hw is not None and orig_hw != in_hw:
            boxes[:, 0::2] *= orig_hw[1] / in_hw[1]
            boxes[:, 1::2] *= orig_hw[0] / in_hw[0]
        rles: list[dict[str, Any]] | None = None
        if masks is not None:
            if masks.dim() == 3:
                masks = masks[:, None]
            if masks.dim() != 4 or masks.shape[0] != len(labels) or masks.shape[1] != 1:
                raise ValueError(
                    f"outputs[{n}]: 'masks' must be [K, 1, H, W] with K={len(labels)}, "
                    f"got {tuple(masks.shape)}"
                )
            masks = masks.detach().cpu()
            if orig_hw is not None and tuple(masks.shape[-2:]) != orig_hw and masks.shape[0]:
                masks = F.interpolate(masks.float(), size=orig_hw, mode="bilinear", align_corners=False)
            binary = (masks[:, 0] > mask_threshold).numpy().astype(np.uint8)  # [K, H, W]
            encoded = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(labels) else []
            rles = [
                {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in encoded
            ]
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        for k, (label, score) in enumerate(zip(labels, scores, strict=True)):
            result = {
                "image_id": int(image_id),
                "category_id": _cat_id(label_to_cat_id, int(label)),
                "score": float(score),
                "bbox": [float(v) for v in xywh[k].tolist()],
            }
            if rles is not None:
                result["segmentation"] = rles[k]
            results.append(result)
    return results


def _height_width(value: Any, name: str) -> tuple[int, int]:
    """``value`` (H, W) as two positive ints, or a ValueError naming it."""
    try:
        hw = tuple(int(v) for v in value)
        exact = all(float(v) == h for v, h in zip(value, hw, strict=True))
    except (TypeError, ValueError, OverflowError, RuntimeError):
        hw, exact = (), False
    if len(hw) != 2 or not exact or min(hw) <= 0:
        raise ValueError(f"{name} must be (height, width), two positive integers, got {value!r}")
    return hw[0], hw[1]


def _image_id(target: Mapping[str, Any], i: int) -> int:
    if not isinstance(target, Mapping) or "image_id" not in target:
        raise ValueError(f"targets[{i}] must be a dict with an 'image_id'")
    value = target["image_id"]
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"targets[{i}]['image_id'] must be one id, got a tensor of shape {list(value.shape)}"
            )
        value = value.item()
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"targets[{i}]['image_id'] must be an integer id, got {value!r}") from None


class Evaluator:
    """Accumulate detection outputs over an evaluation loop, then score them with :func:`coco_evaluate`.

    ``update(outputs, targets)`` takes a batch of torchvision outputs and the dataset's targets (their
    ``image_id``, and ``size`` / ``orig_size`` when present, map predictions back to the original image).
    ``compute()`` gathers every rank's results with ``torch.distributed.all_gather_object`` when a process
    group is initialised (images seen on several ranks, e.g. a padded DistributedSampler, count once),
    scores them on rank 0 over the images seen, and broadcasts the metrics to all ranks.

    Args:
        coco_gt: ground truth, e.g. ``CocoDetection.coco``.
        label_to_cat_id: contiguous label -> COCO category id.
        iou_types: ``("bbox",)`` for box detectors, ``("bbox", "segm")`` for Mask R-CNN.
        mask_threshold: see :func:`detections_to_coco`.
        verbose: print pycocotools' summary tables.
    """

    def __init__(
        self,
        coco_gt: COCO,
        label_to_cat_id: Mapping[int, int] | Sequence[int],
        iou_types: Iterable[str] = ("bbox", "segm"),
        *,
        mask_threshold: float = 0.5,
        verbose: bool = False,
    ) -> None:
        _check_coco(coco_gt)
        if not is_number(mask_threshold):
            raise ValueError(f"mask_threshold must be a finite number, got {mask_threshold!r}")
        self.coco_gt = coco_gt
        self.label_to_cat_id = label_to_cat_id
        self.iou_types = _check_iou_types(iou_types)
        self.mask_threshold = mask_threshold
        self.verbose = verbose
        self._results: dict[int, list[dict[str, Any]]] = {}

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._results = {}

    def update(
        self, outputs: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, Any]]
    ) -> None:
        """Add one batch: ``outputs[i]`` are the detections for the image of ``targets[i]``."""
        if len(outputs) != len(targets):
            raise ValueError(f"outputs and targets differ in length: {len(outputs)} vs {len(targets)}")
        if "segm" in self.iou_types and any("masks" not in o for o in outputs):
            raise ValueError("iou_types includes 'segm' but an output has no 'masks'")
        image_ids = [_image_id(t, i) for i, t in enumerate(targets)]
        sizes = [t.get("size") for t in targets]
        origs = [t.get("orig_size") for t in targets]
        have_sizes = all(s is not None for s in sizes) and all(o is not None for o in origs)
        results = detections_to_coco(
            outputs,
            image_ids,
            self.label_to_cat_id,
            image_sizes=[_height_width(s, f"targets[{i}]['size']") for i, s in enumerate(sizes)]
            if have_sizes
            else None,
            orig_sizes=[_height_width(o, f"targets[{i}]['orig_size']") for i, o in enumerate(origs)]
            if have_sizes
            else None,
            mask_threshold=self.mask_threshold,
        )
        for image_id in image_ids:
            self._results[image_id] = []
        for r in results:
            self._results[r["image_id"]].append(r)

    def _gathered(self) -> dict[int, list[dict[str, Any]]]:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return dict(self._results)
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self._results)
        merged: dict[int, list[dict[str, Any]]] = {}
        for part in parts:
            for image_id, res in part.items():
                merged.setdefault(image_id, res)
        return merged

    def results(self) -> list[dict[str, Any]]:
        """All ranks' COCO results so far (collective under torch.distributed: call on every rank)."""
        return [r for res in self._gathered().values() for r in res]

    @property
    def num_images(self) -> int:
        """Images accumulated on this rank."""
        return len(self._results)

    def compute(self) -> dict[str, dict[str, float]]:
        """Gather and score; returns :func:`coco_evaluate`'s dict on every rank (collective when
        distributed). Scores only the images that were accumulated."""
        import torch.distributed as dist

        merged = self._gathered()
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not merged:
            raise ValueError("Evaluator.compute() called before any update()")
        metrics = None
        if not distributed or dist.get_rank() == 0:
            predictions = [r for res in merged.values() for r in res]
            metrics = coco_evaluate(
                self.coco_gt, predictions, self.iou_types, img_ids=merged.keys(), verbose=self.verbose
            )
        if distributed:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        assert metrics is not None  # computed on rank 0, broadcast to the others
        return metrics
