"""The "deformed fashion" dataset: the embedded default, generated from the shipped Fashion-MNIST subset.

Detection (:func:`generate`, :func:`load`): RGB canvases holding several garments, each warped by a
random similarity + shear + anisotropic scale + smooth elastic field, on a plain or noisy background.
Instance masks are the warped garment silhouettes (hole-filled, thresholded at 0.5 after bilinear
warping); boxes are the tight pixel boxes of those masks, so both are exact. Masks never overlap (a
``gap``-pixel margin separates them); boxes may overlap up to ``max_box_iou``. Canvases are written once
as PNG + COCO instances json under a cache folder and read back with
:class:`deformable.data.CocoDetection`. Train canvases use the subset's training images, val canvases
its test images, so no garment appears in both.

Object size: each object's target sqrt(mask area) is drawn log-uniformly from ``object_size``, or, with
``size_weights=(w_small, w_medium, w_large)``, first a COCO size bucket (sqrt area < 32, 32-96, > 96 px)
and then log-uniformly within that bucket (intersected with ``object_size``). Objects are placed largest
first; one that finds no free spot in ``placement_tries`` random positions is redrawn at 3/4 of its size,
twice, and then left out, so large objects are fewer and objects per image lower than drawn (see below).

What the presets give (seed 0; size buckets by mask area as COCOeval counts them: small < 32^2 <=
medium < 96^2 <= large; the 10 classes are balanced within a few percent)::

    preset   canvas  canvases    objects/image  small/medium/large  sqrt(area) p10/50/90  box side p10/50/90
    smoke    128     48 + 16     1.8 (1-3)      57% / 42% / 1%      14 / 29 / 70          23 / 44 / 120
    default  160     800 + 200   2.9 (1-5)      45% / 44% / 11%     15 / 35 / 98          25 / 56 / 150
    full     256     4000 + 500  3.9 (1-6)      37% / 45% / 18%     17 / 42 / 121         28 / 69 / 199

On 128 px canvases a large object (mask area >= 9216 px) hardly fits, so smoke's APl is mostly NaN.
Generation takes about 15 ms of CPU per 160 px canvas (default: ~20 s, ~40 MB of PNG; full: ~100 s,
~390 MB).

Classification (:func:`deformed_fashion_classification`): one garment per canvas under the same warps,
labels 0..9, cached as one ``.npz``.

Every canvas is a pure function of (seed, split, index) and the parameters: its random stream is
``numpy.random.default_rng([seed, split_code, index])`` and the warps run in float64, so the same
arguments give the same pixels and json on a given platform.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from . import fashion_mnist
from ._checks import is_int, is_number
from .fashion_mnist import CLASSES

__all__ = [
    "CLASSES",
    "PRESETS",
    "DeformedFashionClassification",
    "DeformedFashionPaths",
    "cache_root",
    "dataset_statistics",
    "deformed_fashion_classification",
    "generate",
    "load",
]

# Bump when the generated pixels or annotations change for the same parameters (invalidates caches).
GENERATOR_VERSION = 1
_SPLIT_CODES = {"train": 0, "val": 1}
_CLS_SPLIT_CODES = {"train": 10, "val": 11}
_MANIFEST = "manifest.json"
_COCO_SMALL, _COCO_LARGE = 32.0, 96.0

# Demo presets (see the module docstring for the meaning of each parameter). Statistics of what they
# produce are in each manifest.json; ``python -m deformable.data --preset NAME`` prints them.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        num_train=48,
        num_val=16,
        canvas_size=128,
        objects_per_image=(1, 3),
        object_size=(12, 100),
        size_weights=(0.4, 0.45, 0.15),
    ),
    "default": dict(
        num_train=800,
        num_val=200,
        canvas_size=160,
        objects_per_image=(2, 5),
        object_size=(12, 128),
        size_weights=(0.3, 0.4, 0.3),
    ),
    "full": dict(
        num_train=4000,
        num_val=500,
        canvas_size=256,
        objects_per_image=(2, 6),
        object_size=(14, 160),
        size_weights=(0.35, 0.4, 0.25),
    ),
}


def cache_root(out_dir: str | os.PathLike | None = None) -> Path:
    """Where generated data lives: ``out_dir``, else ``$DEFORMABLE_CACHE``, else ``~/.cache/deformable``."""
    if out_dir is not None:
        return Path(out_dir).expanduser()
    env = os.environ.get("DEFORMABLE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "deformable"


# ----------------------------------------------------------------------------------------------------
# Parameters


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if not isinstance(value, int | Sequence):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _check_range(value: Sequence[float], name: str, low: float, integer: bool = False) -> tuple:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a pair (min, max), got {value!r}")
    pair = tuple(value)
    check = is_int if integer else is_number
    if len(pair) != 2 or not all(check(v) for v in pair):
        raise ValueError(
            f"{name} must be a pair (min, max) of {'ints' if integer else 'numbers'}, got {value!r}"
        )
    if not low <= pair[0] <= pair[1]:
        raise ValueError(f"{name} must satisfy {low} <= min <= max, got {value!r}")
    return pair


# Upper bounds of the warps: beyond them a garment's warped patch grows without bound (a shear of 1e6
# asked numpy for 67 TiB) while the variation stops changing in kind.
_WARP_LIMITS = {"rotation": (0.0, 180.0), "shear": (0.0, 2.0), "aspect": (1.0, 16.0), "elastic": (0.0, 1.0)}
_MAX_CANVAS = 4096


def _warp_params(rotation: float, shear: float, aspect: float, elastic: float) -> dict[str, float]:
    values = {"rotation": rotation, "shear": shear, "aspect": aspect, "elastic": elastic}
    for name, v in values.items():
        lo, hi = _WARP_LIMITS[name]
        if not is_number(v) or not lo <= v <= hi:
            raise ValueError(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    return dict(rotation=float(rotation), shear=float(shear), aspect=float(aspect), elastic=float(elastic))


def _params_hash(kind: str, params: dict[str, Any]) -> str:
    key = json.dumps(
        {"kind": kind, "version": GENERATOR_VERSION, "asset": fashion_mnist.asset_sha256(), **params},
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class _Object:
    label: int  # 0..9
    alpha: np.ndarray  # float64 [h, w], soft coverage in [0, 1]
    shade: np.ndarray  # float64 [h, w], garment intensity in [0, 1]
    mask: np.ndarray  # bool [h, w], alpha >= 0.5; touches all four sides of the crop


def _sample_sizes(
    rng: np.random.Generator, n: int, object_size: tuple, size_weights: tuple | None
) -> np.ndarray:
    lo, hi = object_size
    if size_weights is None:
        return np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))
    edges = [
        (lo, min(hi, _COCO_SMALL)),
        (max(lo, _COCO_SMALL), min(hi, _COCO_LARGE)),
        (max(lo, _COCO_LARGE), hi),
    ]
    weights = np.array(
        [w if a < b else 0.0 for w, (a, b) in zip(size_weights, edges, strict=True)], dtype=float
    )
    if weights.sum() <= 0:
        return np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))
    buckets = rng.choice(3, size=n, p=weights / weights.sum())
    u = rng.uniform(size=n)
    out = np.empty(n)
    for i, b in enumerate(buckets):
        a, c = edges[b]
        out[i] = math.exp(math.log(a) + u[i] * (math.log(c) - math.log(a)))
    return out


@functools.lru_cache(maxsize=512)
def _cubic_weights(n: int, knots: int) -> np.ndarray:
    """Bicubic (align_corners=True) weights interpolating ``knots`` values to ``n``: float64 [n, knots]."""
    eye = torch.eye(knots, dtype=torch.float64).reshape(1, knots, knots, 1)
    w = F.interpolate(eye, size=(n, 1), mode="bicubic", align_corners=True)  # [1, knots, n, 1]
    return w[0, :, :, 0].T.numpy().copy()


def _silhouette_corners(mask: np.ndarray) -> np.ndarray:
    """Source-frame (u, v) corners of a 28x28 silhouette's pixels on its outline: float64 [2, P]."""
    rows, cols = np.nonzero(mask)
    u0, v0 = cols / 14.0 - 1.0, rows / 14.0 - 1.0
    d = 1.0 / 14.0
    return np.concatenate([np.stack([u0 + du, v0 + dv]) for du in (0.0, d) for dv in (0.0, d)], axis=1)


def _warp_object(
    source: torch.Tensor,
    corners: np.ndarray,
    mask_fraction: float,
    size: float,
    rng: np.random.Generator,
    warp: dict[str, float],
    max_hw: tuple[int, int],
    label: int,
) -> _Object | None:
    """Warp one garment. ``source``: float64 [2, 28, 28] (intensity, silhouette); ``corners``: its
    silhouette's pixel corners [2, P] in the source frame [-1, 1]^2; ``size``: target sqrt(mask area) in
    pixels. Returns the tight crop, shrunk until it fits in ``max_hw``; None if the mask is empty.
    """
    theta = math.radians(rng.uniform(-warp["rotation"], warp["rotation"]))
    shear = rng.uniform(-warp["shear"], warp["shear"])
    log_aspect = (
        rng.uniform(-math.log(warp["aspect"]), math.log(warp["aspect"])) if warp["aspect"] > 1 else 0.0
    )
    knots = 4
    coarse = rng.normal(size=(2, knots, knots)) * warp["elastic"]
    # A: source frame -> pixels, det(A) = 1 (rotation @ shear @ area-preserving aspect), scaled below.
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    shr = np.array([[1.0, shear], [0.0, 1.0]])
    asp = np.diag([math.exp(log_aspect / 2), math.exp(-log_aspect / 2)])
    A = rot @ shr @ asp
    a_norm = float(np.linalg.norm(A, 2))
    # The largest displacement of the field (the same function whatever the patch size), sampled finely.
    w64 = _cubic_weights(64, knots)
    max_disp = 1.1 * float(np.sqrt((w64 @ coarse[0] @ w64.T) ** 2 + (w64 @ coarse[1] @ w64.T) ** 2).max())
    scale_margin = 1.0
    for _ in range(12):
        # The 28x28 frame spans [-1, 1]^2; the garment covers mask_fraction of it, so a frame of side
        # `side` px gives a mask area of about mask_fraction * side^2.
        side = size / math.sqrt(max(mask_fraction, 1e-3))
        M = (side / 2) * A
        pts = M @ corners
        margin = (side / 2) * a_norm * max_disp * scale_margin + 2.0
        x0, y0 = math.floor(pts[0].min() - margin), math.floor(pts[1].min() - margin)
        pw, ph = math.ceil(pts[0].max() + margin) - x0, math.ceil(pts[1].max() + margin) - y0
        minv = np.linalg.inv(M)
        X = (x0 + np.arange(pw) + 0.5)[None, :]
        Y = (y0 + np.arange(ph) + 0.5)[:, None]
        u = minv[0, 0] * X + minv[0, 1] * Y
        v = minv[1, 0] * X + minv[1, 1] * Y
        if warp["elastic"] > 0:
            wy, wx = _cubic_weights(ph, knots), _cubic_weights(pw, knots)
            u = u + wy @ coarse[0] @ wx.T
            v = v + wy @ coarse[1] @ wx.T
        grid = torch.from_numpy(np.stack([u, v], axis=-1))[None]  # [1, ph, pw, 2], source frame (u, v)
        out = F.grid_sample(source[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        shade, alpha = out[0, 0].numpy(), out[0, 1].numpy()
        mask = alpha >= 0.5
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            return None
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        if r0 == 0 or c0 == 0 or r1 == ph or c1 == pw:  # cannot happen by the bound above; be safe
            scale_margin *= 2
            continue
        h, w = r1 - r0, c1 - c0
        if h <= max_hw[0] and w <= max_hw[1]:
            crop = np.s_[r0:r1, c0:c1]
            return _Object(label, np.clip(alpha[crop], 0, 1), np.clip(shade[crop], 0, 1), mask[crop])
        size *= 0.95 * min(max_hw[0] / h, max_hw[1] / w)
    return None


def _background(
    rng: np.random.Generator, shape: tuple[int, int], channels: int, mode: str
) -> tuple[np.ndarray, float]:
    """Return (background float64 [H, W, C] in [0, 1], pixel noise sigma for the whole canvas)."""
    H, W = shape
    if mode == "mixed":
        mode = "plain" if rng.uniform() < 0.5 else "noise"
    level = rng.uniform(0.0, 0.3)
    color = level * (1.0 + 0.3 * (rng.uniform(size=channels) - 0.5)) if channels > 1 else np.array([level])
    bg = np.broadcast_to(color, (H, W, channels)).copy()
    if mode == "plain":
        return bg, 0.0
    coarse = rng.normal(size=(channels, 6, 6)) * 0.08
    wy, wx = _cubic_weights(H, 6), _cubic_weights(W, 6)
    low = np.stack([wy @ coarse[c] @ wx.T for c in range(channels)], axis=-1)
    return bg + low, float(rng.uniform(0.01, 0.05))


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.max_pool2d(t, 2 * radius + 1, stride=1, padding=radius)[0, 0].numpy() > 0


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    if boxes.size == 0:
        return np.zeros(0)
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def _paint(canvas: np.ndarray, obj: _Object, y: int, x: int, rng: np.random.Generator) -> None:
    channels: int = canvas.shape[2]
    tint: np.ndarray
    if channels > 1:
        tint = rng.uniform(0.35, 1.0, size=channels)
        tint = tint / tint.max() * rng.uniform(0.75, 1.0)
    else:
        tint = np.array([rng.uniform(0.75, 1.0)])
    floor = 0.25  # the garment's darkest parts stay visibly apart from the background
    color = (floor + (1 - floor) * obj.shade)[..., None] * tint
    h, w = obj.mask.shape
    region = canvas[y : y + h, x : x + w]
    a = obj.alpha[..., None]
    region[...] = region * (1 - a) + color * a


@dataclass
class _Canvas:
    image: np.ndarray  # uint8 [H, W, C]
    labels: list[int]  # 0..9
    masks: list[np.ndarray]  # bool [H, W] each
    boxes: list[tuple[int, int, int, int]]  # x1, y1, x2, y2 (exclusive), pixels


def _find_spot(
    rng: np.random.Generator,
    mask: np.ndarray,
    occupied: np.ndarray,
    placed_boxes: list[tuple[int, int, int, int]],
    max_box_iou: float,
    tries: int,
) -> tuple[int, int, tuple[int, int, int, int]] | None:
    """A random (y, x, box) where ``mask`` [h, w] misses ``occupied`` [H, W] and its box overlaps every
    placed box by IoU <= ``max_box_iou``; None after ``tries`` misses."""
    H, W = occupied.shape
    h, w = mask.shape
    placed = np.array(placed_boxes, dtype=float).reshape(-1, 4)
    for _ in range(tries):
        y, x = int(rng.integers(1, H - h)), int(rng.integers(1, W - w))
        if occupied[y : y + h, x : x + w][mask].any():
            continue
        box = (x, y, x + w, y + h)
        if placed.size and _box_iou(np.array(box, dtype=float), placed).max() > max_box_iou:
            continue
        return y, x, box
    return None


def _render_canvas(
    rng: np.random.Generator,
    pool: tuple[torch.Tensor, list[np.ndarray], np.ndarray, np.ndarray],
    canvas_hw: tuple[int, int],
    channels: int,
    num_objects: int,
    sizes: np.ndarray,
    warp: dict[str, float],
    background: str,
    gap: int,
    max_box_iou: float,
    placement_tries: int,
) -> _Canvas:
    """Render one canvas: ``num_objects`` garments drawn from ``pool`` with target sizes ``sizes`` [n],
    placed largest first. Returns the uint8 image [H, W, channels] and per placed object its label, full
    canvas mask and box."""
    sources, corners, fractions, labels = pool
    H, W = canvas_hw
    canvas, noise_sigma = _background(rng, canvas_hw, channels, background)
    picks = rng.integers(0, len(labels), size=num_objects)
    order = np.argsort(-sizes, kind="stable")
    occupied = np.zeros((H, W), dtype=bool)
    placed_boxes: list[tuple[int, int, int, int]] = []
    out_labels: list[int] = []
    out_masks: list[np.ndarray] = []
    for k in order:
        idx = int(picks[k])
        size, spot = float(sizes[k]), None
        # An object that finds no free spot is redrawn at 3/4 of its size, twice, then left out.
        for _ in range(3):
            obj = _warp_object(
                sources[idx],
                corners[idx],
                float(fractions[idx]),
                size,
                rng,
                warp,
                (H - 2, W - 2),
                int(labels[idx]),
            )
            if obj is None:
                break
            spot = _find_spot(rng, obj.mask, occupied, placed_boxes, max_box_iou, placement_tries)
            if spot is not None:
                break
            size *= 0.75
        if spot is None:
            continue
        assert obj is not None  # a spot is searched for a drawn object only
        y, x, box = spot
        h, w = obj.mask.shape
        _paint(canvas, obj, y, x, rng)
        full = np.zeros((H, W), dtype=bool)
        full[y : y + h, x : x + w] = obj.mask
        # Mark the mask grown by `gap` px as taken (dilating the crop only, padded by `gap`).
        grown = _dilate(np.pad(obj.mask, gap), gap)
        ys, xs = slice(max(y - gap, 0), min(y + h + gap, H)), slice(max(x - gap, 0), min(x + w + gap, W))
        occupied[ys, xs] |= grown[
            ys.start - (y - gap) : ys.stop - (y - gap), xs.start - (x - gap) : xs.stop - (x - gap)
        ]
        placed_boxes.append(box)
        out_labels.append(obj.label)
        out_masks.append(full)
    if noise_sigma > 0:
        canvas = canvas + rng.normal(scale=noise_sigma, size=canvas.shape)
    image = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    return _Canvas(image, out_labels, out_masks, placed_boxes)


@contextlib.contextmanager
def _one_thread():
    """Run torch on one thread: the warps are many small ops, for which thread hand-offs cost more than
    they bring (and contend with training processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=3)
def _pool(split: str) -> tuple[torch.Tensor, list[np.ndarray], np.ndarray, np.ndarray]:
    """(sources float64 [N, 2, 28, 28] = intensity, silhouette; silhouette corners; mask fractions [N];
    labels int64 [N]) of a split of the shipped subset."""
    images, labels = fashion_mnist.load_subset(split)
    masks = fashion_mnist.object_masks(split)
    sources = torch.from_numpy(np.stack([images / 255.0, masks.astype(np.float64)], axis=1))
    corners = [_silhouette_corners(m) for m in masks]
    return sources, corners, masks.mean(axis=(1, 2)), labels


# ----------------------------------------------------------------------------------------------------
# Detection dataset


@dataclass(frozen=True)
class DeformedFashionPaths:
    """Where a generated detection dataset lives. ``images(split)`` / ``annotations(split)`` give the
    arguments of :class:`deformable.data.CocoDetection`."""

    root: Path

    def images(self, split: str) -> Path:
        _check_split(split)
        return self.root / "images" / split

    def annotations(self, split: str) -> Path:
        _check_split(split)
        return self.root / "annotations" / f"instances_{split}.json"

    @property
    def manifest(self) -> Path:
        return self.root / _MANIFEST


def _check_split(split: str) -> None:
    if not isinstance(split, str) or split not in _SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def _detection_params(
    num_train: int,
    num_val: int,
    canvas_size: int | Sequence[int],
    seed: int,
    objects_per_image: Sequence[int],
    object_size: Sequence[float],
    size_weights: Sequence[float] | None,
    rotation: float,
    shear: float,
    aspect: float,
    elastic: float,
    background: str,
    gap: int,
    max_box_iou: float,
    placement_tries: int,
) -> dict[str, Any]:
    for name, v in (("num_train", num_train), ("num_val", num_val), ("seed", seed), ("gap", gap)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    H, W = _pair(canvas_size, "canvas_size")
    if not (16 <= H <= _MAX_CANVAS and 16 <= W <= _MAX_CANVAS):
        raise ValueError(f"canvas_size must be 16 to {_MAX_CANVAS} px per side, got {canvas_size!r}")
    objs = _check_range(objects_per_image, "objects_per_image", 1, integer=True)
    sizes = _check_range(object_size, "object_size", 4)
    if sizes[1] > min(H, W):
        raise ValueError(f"object_size max {sizes[1]} exceeds the canvas side {min(H, W)}")
    if size_weights is not None:
        if (
            isinstance(size_weights, str)
            or not isinstance(size_weights, Sequence)
            or not all(is_number(w) for w in size_weights)
        ):
            raise ValueError(f"size_weights must be 3 finite numbers >= 0, got {size_weights!r}")
        size_weights = tuple(float(w) for w in size_weights)
        if len(size_weights) != 3 or min(size_weights) < 0 or sum(size_weights) <= 0:
            raise ValueError(f"size_weights must be 3 numbers >= 0 with a positive sum, got {size_weights!r}")
    if background not in ("plain", "noise", "mixed"):
        raise ValueError(f"background must be 'plain', 'noise' or 'mixed', got {background!r}")
    if not is_number(max_box_iou) or not 0.0 <= max_box_iou <= 1.0:
        raise ValueError(f"max_box_iou must be a number in [0, 1], got {max_box_iou!r}")
    if not is_int(placement_tries) or placement_tries < 1:
        raise ValueError(f"placement_tries must be an int >= 1, got {placement_tries!r}")
    return dict(
        num_train=num_train,
        num_val=num_val,
        canvas_size=[H, W],
        seed=seed,
        objects_per_image=list(objs),
        object_size=[float(s) for s in sizes],
        size_weights=None if size_weights is None else list(size_weights),
        **_warp_params(rotation, shear, aspect, elastic),
        background=background,
        gap=gap,
        max_box_iou=float(max_box_iou),
        placement_tries=placement_tries,
    )


def _coco_categories() -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": name, "supercategory": "fashion"} for i, name in enumerate(CLASSES)]


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG", compress_level=3)


def _encode_mask(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _generate_split(folder: Path, split: str, count: int, p: dict[str, Any]) -> dict[str, Any]:
    """Render ``count`` canvases into ``folder``/images/<split> and return the COCO json dict."""
    image_dir = folder / "images" / split
    image_dir.mkdir(parents=True)
    pool = _pool(split)
    H, W = p["canvas_size"]
    warp = {k: p[k] for k in ("rotation", "shear", "aspect", "elastic")}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(count):
        rng = np.random.default_rng([p["seed"], _SPLIT_CODES[split], i])
        n = int(rng.integers(p["objects_per_image"][0], p["objects_per_image"][1] + 1))
        sizes = _sample_sizes(rng, n, tuple(p["object_size"]), p["size_weights"] and tuple(p["size_weights"]))
        canvas = _render_canvas(
            rng,
            pool,
            (H, W),
            3,
            n,
            sizes,
            warp,
            p["background"],
            p["gap"],
            p["max_box_iou"],
            p["placement_tries"],
        )
        file_name = f"{i:06d}.png"
        _write_png(image_dir / file_name, canvas.image)
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "width": W, "height": H})
        for label, mask, (x1, y1, x2, y2) in zip(canvas.labels, canvas.masks, canvas.boxes, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": _encode_mask(mask),
                }
            )
    return {
        "info": {"description": f"deformed fashion {split}", "version": GENERATOR_VERSION},
        "licenses": [{"id": 1, "name": "MIT (Fashion-MNIST, Zalando SE 2017)"}],
        "images": images,
        "annotations": annotations,
        "categories": _coco_categories(),
    }


def dataset_statistics(coco_json: dict[str, Any]) -> dict[str, Any]:
    """Summarise a COCO json: images, objects per image (min/mean/max, histogram), COCO size buckets
    (by ``area``: small < 32^2 <= medium < 96^2 <= large), sqrt(area) and box-side percentiles, objects
    per category.

    Raises:
        ValueError: ``coco_json`` lacks the ``images``/``annotations``/``categories`` lists, or an
            annotation lacks a field used here or names an image that is not in ``images``.
    """
    if not isinstance(coco_json, dict) or not all(
        isinstance(coco_json.get(key), list) for key in ("images", "annotations", "categories")
    ):
        raise ValueError("coco_json must be a COCO dict with 'images', 'annotations' and 'categories' lists")
    image_ids = {img.get("id") for img in coco_json["images"] if isinstance(img, dict)}
    for i, a in enumerate(coco_json["annotations"]):
        if not isinstance(a, dict) or not all(k in a for k in ("image_id", "area", "bbox", "category_id")):
            raise ValueError(
                f"coco_json annotations[{i}] must have 'image_id', 'area', 'bbox' and 'category_id'"
            )
        if a["image_id"] not in image_ids:
            raise ValueError(f"coco_json annotations[{i}]: 'image_id' {a['image_id']!r} is not in 'images'")
    n_img = len(coco_json["images"])
    per_image: dict[int, int] = {img["id"]: 0 for img in coco_json["images"]}
    areas: list[float] = []
    sides: list[float] = []
    per_cat: dict[int, int] = {}
    for a in coco_json["annotations"]:
        per_image[a["image_id"]] += 1
        areas.append(a["area"])
        sides.append(max(a["bbox"][2], a["bbox"][3]))
        per_cat[a["category_id"]] = per_cat.get(a["category_id"], 0) + 1
    counts = np.array(list(per_image.values()), dtype=int) if per_image else np.zeros(0, int)
    areas_a = np.array(areas, dtype=float)
    n = max(len(areas), 1)
    buckets = {
        "small": int((areas_a < _COCO_SMALL**2).sum()),
        "medium": int(((areas_a >= _COCO_SMALL**2) & (areas_a < _COCO_LARGE**2)).sum()),
        "large": int((areas_a >= _COCO_LARGE**2).sum()),
    }
    pct = [0, 10, 50, 90, 100]
    names = {c["id"]: c["name"] for c in coco_json["categories"]}
    return {
        "images": n_img,
        "objects": len(areas),
        "objects_per_image": {
            "min": int(counts.min()) if counts.size else 0,
            "mean": round(float(counts.mean()), 3) if counts.size else 0.0,
            "max": int(counts.max()) if counts.size else 0,
            "histogram": {str(k): int((counts == k).sum()) for k in range(int(counts.max()) + 1)}
            if counts.size
            else {},
        },
        "size_buckets": buckets,
        "size_fractions": {k: round(v / n, 3) for k, v in buckets.items()},
        "sqrt_area_percentiles": dict(
            zip(map(str, pct), np.percentile(np.sqrt(areas_a), pct).round(1).tolist(), strict=True)
        )
        if areas
        else {},
        "box_side_percentiles": dict(
            zip(map(str, pct), np.percentile(sides, pct).round(1).tolist(), strict=True)
        )
        if sides
        else {},
        "per_category": {names[k]: per_cat.get(k, 0) for k in sorted(names)},
    }


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_complete(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("complete") is True


def _remove_stale_temps(parent: Path, prefix: str, max_age_s: float = 6 * 3600) -> None:
    """Remove temp folders of interrupted generations (killed processes) older than ``max_age_s``."""
    now = time.time()
    for p in parent.glob(prefix + "*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move the finished temp folder into place; if another process won the race, keep its."""
    try:
        os.rename(tmp, final)
    except OSError:
        if _is_complete(final):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if final.exists():  # an incomplete folder in the way (not made by this module): replace it
            shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)


def generate(
    out_dir: str | os.PathLike | None = None,
    num_train: int = PRESETS["default"]["num_train"],
    num_val: int = PRESETS["default"]["num_val"],
    *,
    canvas_size: int | Sequence[int] = PRESETS["default"]["canvas_size"],
    seed: int = 0,
    objects_per_image: Sequence[int] = PRESETS["default"]["objects_per_image"],
    object_size: Sequence[float] = PRESETS["default"]["object_size"],
    size_weights: Sequence[float] | None = PRESETS["default"]["size_weights"],
    rotation: float = 45.0,
    shear: float = 0.35,
    aspect: float = 1.5,
    elastic: float = 0.1,
    background: str = "mixed",
    gap: int = 2,
    max_box_iou: float = 0.3,
    placement_tries: int = 40,
    force: bool = False,
) -> DeformedFashionPaths:
    """Generate the deformed-fashion detection dataset once and return where it is.

    Output: ``<root>/deformed_fashion/<params-hash>/`` with ``images/{train,val}/NNNNNN.png`` (uint8 RGB
    [H, W, 3]), ``annotations/instances_{train,val}.json`` (COCO; category ids 1..10 = :data:`CLASSES`;
    RLE masks) and ``manifest.json`` (parameters and :func:`dataset_statistics` per split). ``<root>`` is
    :func:`cache_root` (``out_dir``, else ``$DEFORMABLE_CACHE``, else ``~/.cache/deformable``). An
    existing complete folder is reused. Everything is written into a temporary sibling folder that is
    renamed into place at the end, so an interrupted run never leaves a folder that passes for complete.

    Args:
        num_train / num_val: canvases per split.
        canvas_size: H = W, or (H, W), in pixels.
        seed: canvases are a deterministic function of (seed, split, index) and the other arguments.
        objects_per_image: (min, max) objects drawn per canvas (fewer when they do not fit).
        object_size: (min, max) target sqrt(mask area) in pixels.
        size_weights: weights of the COCO small/medium/large buckets, or None for log-uniform sizes.
        rotation: max |rotation| in degrees; shear: max |shear| factor; aspect: max anisotropic stretch
            (log-uniform in [1/aspect, aspect], area-preserving); elastic: std of the smooth elastic
            displacement, in units of half the 28-px source frame.
        background: ``"plain"``, ``"noise"`` (low-frequency shading + pixel noise) or ``"mixed"``.
        gap: minimum pixel distance between masks; max_box_iou: maximum IoU between boxes.
        placement_tries: random positions tried per object before leaving it out.
        force: regenerate even if a complete folder exists.
    """
    p = _detection_params(
        num_train, num_val, canvas_size, seed, objects_per_image, object_size, size_weights,
        rotation, shear, aspect, elastic, background, gap, max_box_iou, placement_tries,
    )  # fmt: skip
    parent = cache_root(out_dir) / "deformed_fashion"
    digest = _params_hash("detection", p)
    final = parent / digest
    if _is_complete(final) and not force:
        return DeformedFashionPaths(final)
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{digest}-"
    _remove_stale_temps(parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the published folder follows the umask
    try:
        (tmp / "annotations").mkdir()
        stats = {}
        for split, count in (("train", num_train), ("val", num_val)):
            with _one_thread():
                coco_json = _generate_split(tmp, split, count, p)
            with open(tmp / "annotations" / f"instances_{split}.json", "w") as f:
                json.dump(coco_json, f, separators=(",", ":"))
            stats[split] = dataset_statistics(coco_json)
        manifest = {
            "dataset": "deformed fashion",
            "generator_version": GENERATOR_VERSION,
            "asset_sha256": fashion_mnist.asset_sha256(),
            "params": p,
            "statistics": stats,
            "categories": list(CLASSES),
            "complete": True,
        }
        # The manifest is written last: a folder without it is never taken as complete.
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        if force and final.exists():
            # Its manifest goes first: killed while deleting, the old folder is incomplete (replaced
            # next time), never a complete-looking one with images missing.
            (final / _MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(final)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DeformedFashionPaths(final)


def load(
    split: str = "train",
    *,
    transforms: Callable | None = None,
    out_dir: str | os.PathLike | None = None,
    preset: str | None = None,
    masks: bool = True,
    **params: Any,
):
    """Return a :class:`deformable.data.CocoDetection` over a split (``"train"`` or ``"val"``) of the
    dataset :func:`generate` makes with ``params`` (starting from :data:`PRESETS` ``[preset]`` when given),
    generating it first if needed; ``masks=False``: targets without instance masks (box-only
    detectors)."""
    from .coco import CocoDetection

    _check_split(split)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        params = {**PRESETS[preset], **params}
    paths = generate(out_dir, **params)
    return CocoDetection(
        paths.images(split), paths.annotations(split), transforms, check_images="exists", masks=masks
    )


# ----------------------------------------------------------------------------------------------------
# Classification dataset


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__


class DeformedFashionClassification(Dataset):
    """Single deformed garments on a canvas, labels 0..9 (:data:`CLASSES`).

    Items: ``(image float32 [channels, H, W] in [0, 1], label int)``; ``transform`` (if any) is applied to
    the image tensor. ``images`` (uint8 [N, H, W]) and ``labels`` (int64 [N]) hold the whole split.
    """

    classes = CLASSES

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, channels: int = 1, transform: Callable | None = None
    ) -> None:
        if not is_int(channels) or channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if transform is not None and not callable(transform):
            raise TypeError(
                f"transform must be None or a callable on image tensors, got {type(transform).__name__}"
            )
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 3:
            got = _describe(images)
            raise TypeError(f"images must be a uint8 tensor [N, H, W], got {got}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            got = _describe(labels)
            raise ValueError(f"labels must be a tensor [N], one per image (N = {images.shape[0]}), got {got}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor (class indices), got {labels.dtype}")
        self.images = images
        self.labels = labels
        self.channels = channels
        self.transform = transform

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div(255).unsqueeze(0)
        if self.channels == 3:
            image = image.expand(3, -1, -1).contiguous()
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def deformed_fashion_classification(
    split: str = "train",
    num_samples: int | None = None,
    *,
    canvas_size: int = 64,
    seed: int = 0,
    object_size: Sequence[float] = (14.0, 40.0),
    rotation: float = 45.0,
    shear: float = 0.35,
    aspect: float = 1.5,
    elastic: float = 0.1,
    background: str = "mixed",
    channels: int = 1,
    transform: Callable | None = None,
    out_dir: str | os.PathLike | None = None,
) -> DeformedFashionClassification:
    """The classification variant: one garment per grey canvas under the detection set's warps.

    Generated once per parameter set (a few seconds for thousands of images) and cached as
    ``<cache_root>/deformed_fashion_cls/<params-hash>.npz`` (written to a temp file, then renamed).

    Args:
        split: ``"train"`` (garments from the subset's training images) or ``"val"`` (its test images).
        num_samples: images in the split; default 6000 for train, 2000 for val. Labels are balanced:
            sample i has label i % 10.
        canvas_size: side of the square canvas in pixels.
        object_size: (min, max) target sqrt(mask area), log-uniform; the garment is shrunk to fit.
        rotation, shear, aspect, elastic, background: as for :func:`generate`.
        channels: 1 (grey) or 3 (grey repeated), the channel count of the returned images.
    """
    if not isinstance(split, str) or split not in _CLS_SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if num_samples is None:
        num_samples = 6000 if split == "train" else 2000
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if (
        isinstance(canvas_size, bool)
        or not isinstance(canvas_size, int)
        or not 16 <= canvas_size <= _MAX_CANVAS
    ):
        raise ValueError(f"canvas_size must be an int in [16, {_MAX_CANVAS}], got {canvas_size!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    sizes = _check_range(object_size, "object_size", 4)
    if background not in ("plain", "noise", "mixed"):
        raise ValueError(f"background must be 'plain', 'noise' or 'mixed', got {background!r}")
    if not is_int(channels) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if transform is not None and not callable(transform):
        raise TypeError(
            f"transform must be None or a callable on image tensors, got {type(transform).__name__}"
        )
    p = dict(
        split=split,
        num_samples=num_samples,
        canvas_size=canvas_size,
        seed=seed,
        object_size=[float(s) for s in sizes],
        **_warp_params(rotation, shear, aspect, elastic),
        background=background,
    )
    parent = cache_root(out_dir) / "deformed_fashion_cls"
    path = parent / f"{_params_hash('classification', p)}.npz"
    cached = _read_classification_cache(path, p) if path.is_file() else None
    if cached is None:
        with _one_thread():
            images, labels = _render_classification(p)
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=".npz", dir=parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, images=images, labels=labels)
            os.chmod(tmp_name, 0o666 & ~_umask())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        cached = images, labels
    image_tensor, label_tensor = torch.from_numpy(cached[0]), torch.from_numpy(cached[1].astype(np.int64))
    return DeformedFashionClassification(image_tensor, label_tensor, channels=channels, transform=transform)


def _read_classification_cache(path: Path, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (images, labels) at ``path``, or None (with a warning) when the file is unreadable or
    does not hold ``p``'s arrays (damaged on disk, or not written by this module): it is regenerated."""
    n, side = p["num_samples"], p["canvas_size"]
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        problem = f"cannot be read ({type(error).__name__}: {error})"
    else:
        if images.dtype == np.uint8 and images.shape == (n, side, side) and labels.shape == (n,):
            return images, labels
        problem = f"holds images {images.dtype} {list(images.shape)}, labels {list(labels.shape)}"
    warnings.warn(
        f"cached classification data {path} {problem}; expected uint8 [{n}, {side}, {side}] images: "
        "regenerating it",
        stacklevel=3,
    )
    return None


def _render_classification(p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    sources, corners, fractions, labels = _pool(p["split"])
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    side = p["canvas_size"]
    warp = {k: p[k] for k in ("rotation", "shear", "aspect", "elastic")}
    n = p["num_samples"]
    images = np.empty((n, side, side), dtype=np.uint8)
    out_labels = np.arange(n, dtype=np.uint8) % 10
    for i in range(n):
        rng = np.random.default_rng([p["seed"], _CLS_SPLIT_CODES[p["split"]], i])
        members = by_class[int(out_labels[i])]
        pick = members[int(rng.integers(0, len(members)))]
        size = _sample_sizes(rng, 1, tuple(p["object_size"]), None)
        pool = (
            sources[pick : pick + 1],
            corners[pick : pick + 1],
            fractions[pick : pick + 1],
            labels[pick : pick + 1],
        )
        canvas = _render_canvas(rng, pool, (side, side), 1, 1, size, warp, p["background"], 0, 1.0, 1)
        images[i] = canvas.image[..., 0]
    return images, out_labels


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Generate a deformed-fashion preset and print its statistics."
    )
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument(
        "--out-dir", default=None, help="cache root (default $DEFORMABLE_CACHE or ~/.cache/deformable)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    paths = generate(args.out_dir, seed=args.seed, **PRESETS[args.preset])
    manifest = json.loads(paths.manifest.read_text())
    print(json.dumps({"root": str(paths.root), **manifest["statistics"]}, indent=2))
    print(f"{time.perf_counter() - start:.1f} s")
