"""A small hand-written COCO dataset (2 images, non-contiguous category ids) for the data and engine tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# Image 1 is 40 wide, 30 high; image 2 is 20 wide, 25 high.
SIZES = {1: (30, 40), 2: (25, 20)}
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]


def rle_of(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def square_mask(h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def coco_dict() -> dict:
    """The json: image 1 has a polygon 'cat' and an RLE 'bird'; image 2 an RLE 'dog' and a crowd 'cat'."""
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "sub/b.png", "width": 20, "height": 25},
        ],
        "categories": CATEGORIES,
        "annotations": [
            {  # polygon: the rectangle x in [2, 12], y in [3, 9]
                "id": 10,
                "image_id": 1,
                "category_id": 3,
                "bbox": [2.0, 3.0, 10.0, 6.0],
                "area": 60.0,
                "iscrowd": 0,
                "segmentation": [[2, 3, 12, 3, 12, 9, 2, 9]],
            },
            {
                "id": 11,
                "image_id": 1,
                "category_id": 11,
                "bbox": [20.0, 10.0, 15.0, 12.0],
                "area": 180.0,
                "iscrowd": 0,
                "segmentation": rle_of(square_mask(30, 40, 10, 20, 22, 35)),
            },
            {
                "id": 12,
                "image_id": 2,
                "category_id": 7,
                "bbox": [5.0, 4.0, 8.0, 9.0],
                "area": 72.0,
                "iscrowd": 0,
                "segmentation": rle_of(square_mask(25, 20, 4, 5, 13, 13)),
            },
            {
                "id": 13,
                "image_id": 2,
                "category_id": 3,
                "bbox": [0.0, 15.0, 20.0, 10.0],
                "area": 200.0,
                "iscrowd": 1,
                "segmentation": rle_of(square_mask(25, 20, 15, 0, 25, 20)),
            },
        ],
    }


def write_dataset(root: Path, data: dict | None = None) -> tuple[Path, Path]:
    """Write the two images (random RGB PNGs) and the json under ``root``; return (image root, json path)."""
    rng = np.random.default_rng(0)
    images = root / "images"
    (images / "sub").mkdir(parents=True, exist_ok=True)
    for image_id, name in ((1, "a.png"), (2, "sub/b.png")):
        h, w = SIZES[image_id]
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(images / name)
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(coco_dict() if data is None else data))
    return images, ann_file
