"""COCO-format detection datasets: loading, annotation checks, and batching.

``CocoDetection(root, ann_file)`` reads a COCO "instances" json (images, annotations, categories) with
pycocotools and returns samples in the form torchvision's detectors take:

- image: float32 [3, H, W] in [0, 1];
- target: ``boxes`` float32 [K, 4] (x1, y1, x2, y2, pixels), ``labels`` int64 [K] (contiguous 1..C),
  ``masks`` uint8 [K, H, W] (only when the dataset has segmentations), ``image_id`` int,
  ``area`` float32 [K] (the json's, at the file's scale), ``iscrowd`` int64 [K], ``orig_size`` int64 [2]
  = (H, W) of the file, and ``size`` int64 [2] = (H, W) after the transforms.

Every annotation problem found before training raises :class:`AnnotationError` (a ``ValueError``)
naming the file, the json entry and the field.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from ._checks import is_int, is_number

__all__ = [
    "AnnotationError",
    "CocoDetection",
    "check_coco_annotations",
    "collate_detection",
    "load_coco_json",
]

_MAX_LISTED = 10
# Boxes may stick out of their image by this much (pixels) before it counts as an error.
_BOX_TOLERANCE = 1.0


class AnnotationError(ValueError):
    """An annotation file or the images it names are not usable; the message says where and why."""


def load_coco_json(ann_file: str | os.PathLike) -> dict[str, Any]:
    """Read a COCO json file.

    Raises:
        FileNotFoundError: ``ann_file`` does not exist.
        AnnotationError: the file is not valid json, or its top level is not an object.
    """
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: invalid json at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: the top level must be a json object, got {type(data).__name__}")
    return data


def _check_segmentation(segm: Any, height: int, width: int) -> str | None:
    """Return a description of what is wrong with ``segm``, or None when it is valid."""
    if isinstance(segm, list):
        return _check_polygons(segm)
    if isinstance(segm, dict):
        return _check_rle(segm, height, width)
    return f"'segmentation' must be a list of polygons or an RLE dict, got {type(segm).__name__}"


def _check_polygons(segm: list[Any]) -> str | None:
    """Each polygon must be a list of >= 6 finite numbers, (x, y) pairs."""
    for j, poly in enumerate(segm):
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            return f"'segmentation'[{j}] must be a polygon: a list of >= 6 numbers (x, y pairs)"
        if not all(is_number(v) for v in poly):
            return f"'segmentation'[{j}] holds a non-numeric or non-finite coordinate"
    return None


def _check_rle(segm: dict[str, Any], height: int, width: int) -> str | None:
    """Check an RLE's ``size`` and that its ``counts`` (run lengths, or pycocotools' compressed string)
    cover exactly the image: pycocotools fails on too many pixels and leaves garbage for too few."""
    size, counts = segm.get("size"), segm.get("counts")
    if not isinstance(size, list | tuple) or len(size) != 2 or not all(is_int(v) and v >= 0 for v in size):
        return f"RLE 'segmentation' needs 'size': [height, width] (two non-negative integers), got {size!r}"
    if list(size) != [height, width]:
        return (
            f"RLE 'segmentation' size {size[0]}x{size[1]} (HxW) does not match the image's "
            f"height x width {height}x{width}"
        )
    if isinstance(counts, list):
        if not all(is_int(c) and c >= 0 for c in counts):
            return "RLE 'segmentation' 'counts' must be a list of non-negative integer run lengths"
        pixels = sum(counts)
    elif isinstance(counts, str | bytes):
        runs = _decode_rle_string(counts)
        if runs is None:
            return "RLE 'segmentation' 'counts' is not a valid compressed RLE string"
        pixels = int(runs.sum())
    else:
        return "RLE 'segmentation' needs 'counts' (a string or a list of run lengths)"
    if pixels != height * width:
        return (
            f"RLE 'segmentation' 'counts' cover {pixels} pixels, not the image's "
            f"{height}x{width} = {height * width}"
        )
    return None


# A number needs at most 33 bits (a difference of two 32-bit run lengths): 7 groups of 5.
_RLE_MAX_GROUPS = 7


def _decode_rle_string(counts: str | bytes) -> np.ndarray | None:
    """The run lengths of a compressed RLE string, as pycocotools' ``rleFrString`` reads them, or None
    when it is malformed (a character outside '0'..'o', a truncated or oversized number, a negative run).

    Each number is little-endian groups of 5 bits (character - 48; bit 0x20: more groups follow; bit
    0x10 of the last group: the sign); from the fourth number on it is a difference to the one two back.
    Vectorised, as crowd annotations can have thousands of runs.
    """
    raw = counts if isinstance(counts, bytes) else counts.encode("utf-8", "surrogatepass")
    codes = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if not codes.size:
        return codes
    if ((codes < 0) | (codes > 63)).any() or codes[-1] & 0x20:
        return None
    last = np.flatnonzero(~codes & 0x20)  # the last group of each number
    first = np.concatenate(([0], last[:-1] + 1))
    groups = last - first + 1
    if (groups > _RLE_MAX_GROUPS).any():
        return None
    position = np.arange(codes.size) - np.repeat(first, groups)
    values = np.add.reduceat((codes & 0x1F) << (5 * position), first)
    values -= np.where(codes[last] & 0x10, 1 << (5 * groups), 0)
    # Undo the differences: runs 1, 3, 5, ... and runs 2, 4, 6, ... are each a running sum.
    values[1::2] = np.cumsum(values[1::2])
    values[2::2] = np.cumsum(values[2::2])
    return None if (values < 0).any() else values


def check_coco_annotations(
    data: dict[str, Any],
    ann_file: str | os.PathLike = "<json>",
    root: str | os.PathLike | None = None,
    *,
    check_images: str = "size",
    drop_degenerate: bool = False,
) -> dict[str, Any]:
    """Check a parsed COCO instances json and return it, ready for pycocotools.

    Checks: the ``images``/``annotations``/``categories`` lists and their fields; unique ids; every
    annotation's ``image_id`` and ``category_id`` known; ``bbox`` = 4 finite numbers with width and
    height > 0, inside its image (1 px tolerance); ``iscrowd`` 0 or 1; ``segmentation`` polygons (lists
    of >= 6 finite numbers) or RLE with the image's size whose ``counts`` (run lengths or a compressed
    string that decodes) cover exactly its pixels. With ``root`` and ``check_images`` = ``"exists"``,
    every image file must exist under ``root``; with ``"size"`` (default) its header is also read and
    its size must equal the json's width and height; ``"none"`` skips the files.

    Annotations without ``area`` get one (mask area, else box area). With ``drop_degenerate``,
    annotations whose box has width or height <= 0 are dropped with a warning instead of failing.

    Returns:
        ``data`` (a shallow copy when annotations were dropped or areas filled in).

    Raises:
        AnnotationError: naming ``ann_file``, the entry (list and index, id) and the field.
    """
    if not isinstance(data, dict):
        raise TypeError(f"data must be a dict (a parsed COCO json), got {type(data).__name__}")
    if check_images not in ("size", "exists", "none"):
        raise ValueError(f"check_images must be 'size', 'exists' or 'none', got {check_images!r}")
    errors: list[str] = []

    def fail(msg: str) -> None:
        errors.append(msg)

    def report() -> None:
        if errors:
            more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else ""
            listed = "\n  ".join(errors[:_MAX_LISTED])
            raise AnnotationError(f"{ann_file}: {len(errors)} annotation problem(s):\n  {listed}{more}")

    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            fail(f"top-level '{key}' must be a list, got {type(data.get(key)).__name__}")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        fail(f"top-level 'annotations' must be a list, got {type(anns).__name__}")
    report()

    cat_ids: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not is_int(cat.get("id")):
            fail(f"categories[{i}]: 'id' must be an integer")
            continue
        if cat["id"] in cat_ids:
            fail(f"categories[{i}]: duplicate id {cat['id']}")
        if not isinstance(cat.get("name"), str):
            fail(f"categories[{i}] (id {cat['id']}): 'name' must be a string")
        cat_ids.add(cat["id"])
    if not data["categories"]:
        fail("'categories' is empty")

    images: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not is_int(img.get("id")):
            fail(f"images[{i}]: 'id' must be an integer")
            continue
        where = f"images[{i}] (id {img['id']})"
        if img["id"] in images:
            fail(f"{where}: duplicate id")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            fail(f"{where}: 'file_name' must be a non-empty string")
            continue
        bad_size = False
        for field in ("width", "height"):
            if not is_int(img.get(field)) or img[field] <= 0:
                fail(f"{where}: '{field}' must be a positive integer, got {img.get(field)!r}")
                bad_size = True
        if not bad_size:
            images[img["id"]] = img
    report()

    ann_ids: set[int] = set()
    kept: list[dict[str, Any]] = []
    dropped = 0
    filled_area = False
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict) or not is_int(ann.get("id")):
            fail(f"annotations[{i}]: 'id' must be an integer")
            continue
        where = f"annotations[{i}] (id {ann['id']})"
        if ann["id"] in ann_ids:
            fail(f"{where}: duplicate id")
        ann_ids.add(ann["id"])
        image_id = ann.get("image_id")
        img = images.get(image_id) if image_id is not None and _hashable(image_id) else None
        if img is None:
            fail(f"{where}: 'image_id' {ann.get('image_id')!r} is not in 'images'")
            continue
        if not _hashable(ann.get("category_id")) or ann.get("category_id") not in cat_ids:
            fail(f"{where}: unknown 'category_id' {ann.get('category_id')!r} (known: {sorted(cat_ids)})")
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1) or isinstance(iscrowd, bool):
            fail(f"{where}: 'iscrowd' must be 0 or 1, got {iscrowd!r}")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
            fail(f"{where}: 'bbox' must be [x, y, width, height] of finite numbers, got {bbox!r}")
            continue
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            if drop_degenerate:
                dropped += 1
                continue
            fail(f"{where}: degenerate 'bbox' {bbox} (width and height must be > 0)")
            continue
        W, H = img["width"], img["height"]
        tol = _BOX_TOLERANCE
        if x < -tol or y < -tol or x + w > W + tol or y + h > H + tol:
            fail(f"{where}: 'bbox' {bbox} lies outside its image ({W}x{H}, image id {img['id']})")
        if "segmentation" in ann and ann["segmentation"] != []:
            problem = _check_segmentation(ann["segmentation"], H, W)
            if problem:
                fail(f"{where}: {problem}")
        if "area" in ann:
            if not is_number(ann["area"]) or ann["area"] < 0:
                fail(f"{where}: 'area' must be a finite number >= 0, got {ann['area']!r}")
        else:
            filled_area = True
        kept.append(ann)
    report()

    if root is not None and check_images != "none":
        _check_image_files(images, Path(root), check_images, fail)
        report()

    if dropped:
        warnings.warn(f"{ann_file}: dropped {dropped} annotation(s) with a degenerate box", stacklevel=2)
    if dropped or filled_area:
        data = dict(data)
        data["annotations"] = [_with_area(a, images[a["image_id"]]) for a in kept]
    return data


def _hashable(value: Any) -> bool:
    """Whether ``value`` can be looked up in a dict or set (a json list or object cannot)."""
    return not isinstance(value, list | dict)


def _with_area(ann: dict[str, Any], img: dict[str, Any]) -> dict[str, Any]:
    if "area" in ann:
        return ann
    ann = dict(ann)
    segm = ann.get("segmentation")
    if segm:
        ann["area"] = float(mask_utils.area(_to_rle(segm, img["height"], img["width"])))
    else:
        ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    return ann


def _to_rle(segm: Any, height: int, width: int) -> dict[str, Any]:
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def _check_image_files(
    images: dict[int, dict[str, Any]], root: Path, mode: str, fail: Callable[[str], None]
) -> None:
    from PIL import Image, UnidentifiedImageError

    for img in images.values():
        path = root / img["file_name"]
        where = f"image id {img['id']} ('file_name' {img['file_name']!r})"
        if not path.is_file():
            fail(f"{where}: image file {str(path)!r} does not exist")
            continue
        if mode != "size":
            continue
        try:
            with Image.open(path) as im:
                width, height = im.size
        except (UnidentifiedImageError, OSError) as e:
            fail(f"{where}: image file {str(path)!r} cannot be read: {e}")
            continue
        if (width, height) != (img["width"], img["height"]):
            fail(
                f"{where}: the file is {width}x{height} (WxH) but the json says "
                f"'width' {img['width']}, 'height' {img['height']}"
            )


def _quiet_coco(data: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _rgb_array(im) -> np.ndarray:
    """A PIL image as uint8 [H, W, 3]. Single-channel images of more than 8 bits (16-bit PNGs, 32-bit
    integer or float ones) are scaled from 0..65535 to 0..255 (values within 0..255 stay as they are,
    and a float image within 0..1 is scaled from 0..1): PIL's own conversion clips them, which turned a
    16-bit image almost entirely white."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        values = np.asarray(im, dtype=np.float64)
        if values.size and not np.isfinite(values).all():
            raise ValueError(f"a {im.mode!r} image with non-finite values")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0 or high > 65535:
            raise ValueError(f"a {im.mode!r} image with values in [{low:g}, {high:g}], outside 0..65535")
        if im.mode.startswith("I;16") or high > 255:
            values = values / 257.0
        elif im.mode == "F" and high <= 1.0:
            values = values * 255.0
        gray = np.rint(values).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.array(im.convert("RGB"), dtype=np.uint8)


class CocoDetection(Dataset):
    """A COCO-format instance detection/segmentation dataset (see the module docstring for samples).

    Args:
        root: folder the images' ``file_name`` entries are relative to.
        ann_file: the COCO instances json.
        transforms: callable ``(image, target) -> (image, target)`` applied to a uint8
            ``tv_tensors.Image`` [3, H, W] and a target holding ``tv_tensors.BoundingBoxes`` (XYXY) and
            ``tv_tensors.Mask``, e.g. :func:`deformable.data.train_transforms`. The image is converted to
            float in [0, 1] afterwards if the transforms left it uint8.
        check_images: ``"size"`` (default: every file exists and its size matches the json),
            ``"exists"``, or ``"none"``; see :func:`check_coco_annotations`.
        include_crowd: keep ``iscrowd=1`` annotations in the targets (default False, as detectors
            train on non-crowd objects only; evaluation still sees them through :attr:`coco`).
        drop_degenerate: drop boxes with width or height <= 0 instead of raising.
        remove_empty: drop images that have no (kept) annotation.
        masks: decode instance masks into the targets when the annotations have segmentations (default);
            False leaves them out, for box-only detectors (decoding polygons and RLEs, and transforming
            the masks with the image, is much of a sample's loading time).

    Attributes:
        coco: the checked ``pycocotools.coco.COCO`` object, for evaluation.
        ids: image ids in sample order.
        cat_id_to_label / label_to_cat_id: COCO category id <-> contiguous label 1..C (sorted ids; see
            :meth:`use_categories` to label as the training set does).
        class_names: ``class_names[label]`` is the category name; index 0 is ``"__background__"``.
        num_classes: C, the number of categories (background excluded).
        has_masks: whether targets carry ``masks`` (``masks`` and any annotation has a segmentation).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Callable | None = None,
        *,
        check_images: str = "size",
        include_crowd: bool = False,
        drop_degenerate: bool = False,
        remove_empty: bool = False,
        masks: bool = True,
    ) -> None:
        if not isinstance(masks, bool):
            raise TypeError(f"masks must be a bool, got {masks!r}")
        self.root = Path(root)
        self.ann_file = Path(ann_file)
        if transforms is not None and not callable(transforms):
            raise TypeError(
                f"transforms must be None or a callable (image, target) -> (image, target), "
                f"got {type(transforms).__name__}"
            )
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder root={str(self.root)!r} does not exist")
        data = load_coco_json(self.ann_file)
        data = check_coco_annotations(
            data, self.ann_file, self.root, check_images=check_images, drop_degenerate=drop_degenerate
        )
        self.coco = _quiet_coco(data)
        self.transforms = transforms
        self.include_crowd = include_crowd

        cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        self.cat_id_to_label: dict[int, int] = {c["id"]: i + 1 for i, c in enumerate(cats)}
        self.label_to_cat_id: dict[int, int] = {v: k for k, v in self.cat_id_to_label.items()}
        self.class_names: tuple[str, ...] = ("__background__", *(c["name"] for c in cats))
        self.num_classes = len(cats)
        self.has_masks = masks and any(a.get("segmentation") for a in self.coco.anns.values())

        ids = [img["id"] for img in data["images"]]
        if remove_empty:
            ids = [i for i in ids if self._annotations(i)]
        self.ids: list[int] = ids

    @property
    def categories(self) -> list[dict[str, Any]]:
        """The categories in label order: ``categories[label - 1]`` is ``{"id": ..., "name": ...}``."""
        labels = sorted(self.label_to_cat_id.items())
        return [{"id": cat_id, "name": self.class_names[label]} for label, cat_id in labels]

    def use_categories(self, categories: Sequence[Mapping[str, Any]], source: str | os.PathLike) -> None:
        """Label objects as another annotation file does: ``categories`` is that file's category list
        (dicts with an int ``id`` and a str ``name``, e.g. the training set's :attr:`categories`), and
        label ``l`` becomes the ``l``-th of them by id, as in a :class:`CocoDetection` of ``source``.

        A validation set must be labelled as the training set was, or a detector's label ``l`` is scored
        as another category when the two files list different categories. Categories of ``source`` that
        this file lacks are fine (nothing of theirs is in the ground truth).

        Raises:
            ValueError: an entry is not such a dict, or this file has categories ``source`` lacks (a
                model trained on ``source`` cannot detect them), naming both files and the ids.
        """
        names: dict[int, str] = {}
        for i, cat in enumerate(categories):
            if not (isinstance(cat, Mapping) and is_int(cat.get("id")) and isinstance(cat.get("name"), str)):
                raise ValueError(
                    f"categories[{i}] must be a dict with an int 'id' and a str 'name', got {cat!r}"
                )
            names[cat["id"]] = cat["name"]
        extra = sorted(set(self.coco.cats) - set(names))
        if extra:
            raise ValueError(
                f"{self.ann_file} has categories {extra[:_MAX_LISTED]} that {source} lacks: a model trained "
                f"on {source} cannot detect them (its categories: {sorted(names)[:_MAX_LISTED]})"
            )
        ids = sorted(names)
        self.cat_id_to_label = {c: i + 1 for i, c in enumerate(ids)}
        self.label_to_cat_id = {v: k for k, v in self.cat_id_to_label.items()}
        self.class_names = ("__background__", *(names[c] for c in ids))
        self.num_classes = len(ids)

    def _annotations(self, image_id: int) -> list[dict[str, Any]]:
        anns = self.coco.imgToAnns.get(image_id, [])
        if not self.include_crowd:
            anns = [a for a in anns if not a.get("iscrowd", 0)]
        return anns

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> torch.Tensor:
        """Return image ``image_id`` as uint8 [3, H, W], checking its size against the json."""
        from PIL import Image, UnidentifiedImageError

        info = self.coco.imgs[image_id]
        path = self.root / info["file_name"]
        try:
            with Image.open(path) as im:
                array = _rgb_array(im)
        except (FileNotFoundError, UnidentifiedImageError, OSError, ValueError) as e:
            raise AnnotationError(
                f"{self.ann_file}: image id {image_id}: cannot read {str(path)!r}: {e}"
            ) from e
        if array.shape[:2] != (info["height"], info["width"]):
            raise AnnotationError(
                f"{self.ann_file}: image id {image_id}: {str(path)!r} is {array.shape[1]}x{array.shape[0]} "
                f"(WxH) but the json says 'width' {info['width']}, 'height' {info['height']}"
            )
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def load_target(self, image_id: int) -> dict[str, Any]:
        """Return the untransformed target of ``image_id`` (boxes, labels, masks, ...; see the module)."""
        from torchvision import tv_tensors

        info = self.coco.imgs[image_id]
        H, W = info["height"], info["width"]
        anns = self._annotations(image_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(H, W)),
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": int(image_id),
            "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "orig_size": torch.tensor([H, W], dtype=torch.int64),
        }
        if self.has_masks:
            masks = np.zeros((len(anns), H, W), dtype=np.uint8)
            for k, a in enumerate(anns):
                segm = a.get("segmentation")
                if segm:
                    with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation notice
                        warnings.simplefilter("ignore", DeprecationWarning)
                        masks[k] = mask_utils.decode(_to_rle(segm, H, W))
                else:  # no segmentation for this one object: its box stands in for the mask
                    x1, y1, x2, y2 = boxes[k].tolist()
                    masks[k, max(int(y1), 0) : math.ceil(y2), max(int(x1), 0) : math.ceil(x2)] = 1
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Return (image float32 [3, H, W] in [0, 1], target dict); see the module docstring."""
        from torchvision import tv_tensors
        from torchvision.transforms.v2.functional import to_dtype

        image_id = self.ids[index]
        image = tv_tensors.Image(self.load_image(image_id))
        target = self.load_target(image_id)
        if self.transforms is not None:
            result = self.transforms(image, target)
            if not isinstance(result, tuple | list) or len(result) != 2:
                raise TypeError(
                    f"transforms must return (image, target), got {type(result).__name__}"
                    + (f" of length {len(result)}" if isinstance(result, tuple | list) else "")
                )
            image, target = result
        image = image.as_subclass(torch.Tensor)
        if image.dtype == torch.uint8:  # the same conversion as v2.ToDtype(torch.float32, scale=True)
            image = to_dtype(image, torch.float32, scale=True)
        for key in ("boxes", "masks"):
            if key in target and isinstance(target[key], torch.Tensor):
                target[key] = target[key].as_subclass(torch.Tensor)
        target["size"] = torch.tensor(image.shape[-2:], dtype=torch.int64)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, ann_file={str(self.ann_file)!r}, "
            f"images={len(self)}, classes={self.num_classes}, masks={self.has_masks})"
        )


def collate_detection(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Batch detection samples as torchvision's detectors take them: (list of images, list of targets).

    Images keep their own sizes ([3, H_i, W_i]); the model's transform pads them into a batch.
    """
    images = [sample[0] for sample in batch]
    targets = [sample[1] for sample in batch]
    return images, targets
