"""The embedded "deformed fashion" data: shipped asset, determinism, annotation validity, caching."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from deformable.data import CocoDetection, deformed_fashion, fashion_mnist
from deformable.data.deformed_fashion import deformed_fashion_classification, generate, load

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools

# Small but varied: all three COCO size buckets occur in the train split.
SMALL = dict(
    num_train=5,
    num_val=3,
    canvas_size=160,
    objects_per_image=(2, 4),
    object_size=(10, 128),
    size_weights=(1, 1, 1),
)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("cache"), seed=3, **SMALL)


def _pixels(folder):
    return {p.name: np.array(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_shipped_subset_and_licence():
    images, labels = fashion_mnist.load_subset("train")
    assert images.shape == (2500, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [250] * 10
    images, labels = fashion_mnist.load_subset("val")
    assert images.shape == (800, 28, 28) and np.bincount(labels).tolist() == [80] * 10
    assets = resources.files("deformable.data").joinpath("assets")
    licence = assets.joinpath("LICENSE-fashion-mnist.txt").read_text(encoding="utf-8")
    assert "Zalando SE" in licence and "MIT License" in licence
    assert len(assets.joinpath("fashion_mnist_subset.npz").read_bytes()) < 1_500_000
    masks = fashion_mnist.object_masks("train")
    assert masks.shape == (2500, 28, 28) and masks.any(axis=(1, 2)).all()
    assert len(fashion_mnist.CLASSES) == 10 and fashion_mnist.CLASSES[9] == "Ankle boot"


def test_generated_layout_and_manifest(generated):
    root = generated.root
    assert root.parent.name == "deformed_fashion" and len(root.name) == 16
    manifest = json.loads(generated.manifest.read_text())
    assert manifest["complete"] is True and manifest["params"]["seed"] == 3
    assert manifest["categories"] == list(fashion_mnist.CLASSES)
    for split, count in (("train", 5), ("val", 3)):
        assert len(list(generated.images(split).glob("*.png"))) == count
        stats = manifest["statistics"][split]
        assert stats["images"] == count and stats["objects_per_image"]["min"] >= 1
    assert not list(root.parent.glob(".tmp-*"))


def test_annotations_are_valid(generated):
    for split in ("train", "val"):
        data = json.loads(generated.annotations(split).read_text())
        assert [c["id"] for c in data["categories"]] == list(range(1, 11))
        by_image = {img["id"]: [] for img in data["images"]}
        for ann in data["annotations"]:
            by_image[ann["image_id"]].append(ann)
        buckets = set()
        for img in data["images"]:
            H, W = img["height"], img["width"]
            assert (H, W) == (160, 160)
            assert Image.open(generated.images(split) / img["file_name"]).size == (W, H)
            union = np.zeros((H, W), dtype=np.int32)
            assert by_image[img["id"]], "every canvas holds at least one object"
            for ann in by_image[img["id"]]:
                mask = mask_utils.decode(ann["segmentation"])
                x, y, w, h = ann["bbox"]
                assert (
                    w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= W and y + h <= H
                )  # inside the canvas
                assert mask.any(), "masks are non-empty"
                ys, xs = np.nonzero(mask)
                # The box is the mask's tight pixel box: the mask lies inside and touches all four sides.
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
                assert ann["area"] == mask.sum() == mask_utils.area(ann["segmentation"])
                assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 10
                union += mask
                area = ann["area"]
                buckets.add("s" if area < 32**2 else "m" if area < 96**2 else "l")
            assert union.max() <= 1, "masks never overlap"
        if split == "train":
            assert buckets == {"s", "m", "l"}


def test_loader_reads_generated_data(generated):
    ds = CocoDetection(generated.images("train"), generated.annotations("train"))
    assert ds.num_classes == 10 and ds.class_names[1:] == fashion_mnist.CLASSES
    image, target = ds[0]
    assert image.shape == (3, 160, 160)
    K = target["labels"].numel()
    assert target["masks"].shape == (K, 160, 160) and target["boxes"].shape == (K, 4)
    for box, mask in zip(target["boxes"], target["masks"], strict=True):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert torch.equal(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float(), box)


def test_determinism(generated, tmp_path):
    again = generate(tmp_path / "again", seed=3, **SMALL)
    assert again.root.name == generated.root.name  # same parameters, same cache key
    for split in ("train", "val"):
        assert again.annotations(split).read_bytes() == generated.annotations(split).read_bytes()
        a, b = _pixels(again.images(split)), _pixels(generated.images(split))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    other = generate(tmp_path / "again", seed=4, **SMALL)
    assert other.root != again.root
    assert other.annotations("train").read_text() != again.annotations("train").read_text()
    a, b = _pixels(other.images("train")), _pixels(again.images("train"))
    assert not any(np.array_equal(a[k], b[k]) for k in a)


def test_canvas_depends_only_on_seed_split_index(generated, tmp_path):
    more = generate(tmp_path, seed=3, **{**SMALL, "num_train": 6})
    assert more.root != generated.root
    first = json.loads(generated.annotations("train").read_text())["annotations"]
    extended = json.loads(more.annotations("train").read_text())["annotations"]
    assert extended[: len(first)] == first
    assert np.array_equal(
        np.array(Image.open(more.images("train") / "000004.png")),
        np.array(Image.open(generated.images("train") / "000004.png")),
    )


def test_existing_dataset_is_reused(generated):
    stamp = generated.manifest.stat().st_mtime_ns
    paths = generate(generated.root.parent.parent, seed=3, **SMALL)
    assert paths == generated and paths.manifest.stat().st_mtime_ns == stamp


def test_cache_root_and_load_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFORMABLE_CACHE", str(tmp_path / "env"))
    assert deformed_fashion.cache_root() == tmp_path / "env"
    assert deformed_fashion.cache_root(tmp_path / "arg") == tmp_path / "arg"
    ds = load("val", **{**SMALL, "num_train": 1, "num_val": 2})
    assert isinstance(ds, CocoDetection) and len(ds) == 2
    assert ds.root.is_relative_to(tmp_path / "env" / "deformed_fashion")
    monkeypatch.delenv("DEFORMABLE_CACHE")
    assert deformed_fashion.cache_root().parts[-2:] == (".cache", "deformable")


def test_presets_are_valid():
    for name, params in deformed_fashion.PRESETS.items():
        p = deformed_fashion._detection_params(
            **{**params, "seed": 0, "rotation": 45, "shear": 0.3, "aspect": 1.5, "elastic": 0.1},
            background="mixed", gap=2, max_box_iou=0.3, placement_tries=40,
        )  # fmt: skip
        assert p["canvas_size"][0] >= 128, name
    with pytest.raises(ValueError, match="preset must be one of"):
        load("train", preset="huge")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"canvas_size": 8}, "canvas_size"),
        ({"objects_per_image": (3, 2)}, "objects_per_image"),
        ({"object_size": (10, 500)}, "exceeds the canvas"),
        ({"background": "stripes"}, "background"),
        ({"aspect": 0.5}, "aspect"),
        ({"size_weights": (1, 1)}, "size_weights"),
        ({"num_train": -1}, "num_train"),
        # Beyond these bounds a warped patch grew without limit (shear 1e6 asked for 67 TiB).
        ({"shear": 1e6}, r"shear must be a number in \[0, 2\]"),
        ({"elastic": 1e6}, "elastic"),
        ({"rotation": 1e308}, "rotation"),
        ({"aspect": 1e300}, "aspect"),
        ({"rotation": True}, "rotation"),
        ({"canvas_size": 10**9}, "canvas_size"),
        ({"size_weights": (float("nan"), 1, 1)}, "size_weights"),
        ({"size_weights": ("a", 1, 1)}, "size_weights"),
        # were TypeErrors from deep inside: 'float' object is not iterable, '<=' not supported
        ({"canvas_size": 64.5}, "canvas_size must be an int or a pair of ints"),
        ({"size_weights": 1.0}, "size_weights"),
        ({"size_weights": {1, 2, 3}}, "size_weights"),  # a set has no order: silently shuffled weights
        ({"max_box_iou": "0.3"}, r"max_box_iou must be a number in \[0, 1\]"),
        ({"max_box_iou": None}, "max_box_iou"),
        ({"placement_tries": True}, "placement_tries"),
    ],
)
def test_bad_parameters(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, **{**SMALL, **kwargs})
    assert not (tmp_path / "deformed_fashion").exists() or not any((tmp_path / "deformed_fashion").iterdir())


def test_interrupted_generation_leaves_no_valid_looking_cache(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_write = deformed_fashion._write_png

    def failing_write(path, image):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated interruption")
        real_write(path, image)

    monkeypatch.setattr(deformed_fashion, "_write_png", failing_write)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, seed=1, **SMALL)
    parent = tmp_path / "deformed_fashion"
    assert list(parent.iterdir()) == []  # neither a published folder nor a leftover temp folder

    # A run killed outright leaves its temp folder behind; it is never taken for the dataset.
    monkeypatch.setattr(deformed_fashion, "_write_png", real_write)
    digest = deformed_fashion._params_hash(
        "detection",
        deformed_fashion._detection_params(
            **SMALL, seed=1, rotation=45.0, shear=0.35, aspect=1.5, elastic=0.1, background="mixed",
            gap=2, max_box_iou=0.3, placement_tries=40,
        ),
    )  # fmt: skip
    stale = parent / f".tmp-{digest}-killed"
    (stale / "annotations").mkdir(parents=True)
    (stale / "manifest.json").write_text('{"complete": true}')
    # ... and a final folder that lacks its manifest (e.g. copied by hand, half-deleted) is not complete.
    (parent / digest / "images").mkdir(parents=True)
    paths = generate(tmp_path, seed=1, **SMALL)
    assert paths.root == parent / digest
    manifest = json.loads(paths.manifest.read_text())
    assert manifest["complete"] is True
    assert len(json.loads(paths.annotations("train").read_text())["images"]) == SMALL["num_train"]


def test_classification_variant(tmp_path):
    ds = deformed_fashion_classification("train", 30, canvas_size=48, object_size=(10, 30), out_dir=tmp_path)
    assert len(ds) == 30 and ds.images.shape == (30, 48, 48) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [i % 10 for i in range(30)]
    image, label = ds[13]
    assert image.shape == (1, 48, 48) and image.dtype == torch.float32 and label == 3
    assert image.min() >= 0.0 and image.max() <= 1.0
    cached = list((tmp_path / "deformed_fashion_cls").glob("*.npz"))
    assert len(cached) == 1 and not list((tmp_path / "deformed_fashion_cls").glob(".tmp-*"))

    again = deformed_fashion_classification(
        "train", 30, canvas_size=48, object_size=(10, 30), out_dir=tmp_path / "b", channels=3
    )
    assert torch.equal(again.images, ds.images)
    assert again[13][0].shape == (3, 48, 48)
    val = deformed_fashion_classification("val", 30, canvas_size=48, object_size=(10, 30), out_dir=tmp_path)
    assert not torch.equal(val.images, ds.images)
    other = deformed_fashion_classification(
        "train", 30, canvas_size=48, object_size=(10, 30), seed=1, out_dir=tmp_path
    )
    assert not torch.equal(other.images, ds.images)
    # Every image holds one garment: some pixels clearly brighter than the darkest background level.
    assert all((img.int().max() - img.int().min()) > 60 for img in ds.images)
    with pytest.raises(ValueError, match="split"):
        deformed_fashion_classification("test", out_dir=tmp_path)


def test_bad_classification_arguments():
    from deformable.data.deformed_fashion import (
        DeformedFashionClassification,
        deformed_fashion_classification,
    )

    for kwargs, message in (
        ({"seed": -1}, "seed"),
        ({"seed": "a"}, "seed"),
        ({"canvas_size": 10**9}, "canvas_size"),
        ({"object_size": (4, float("inf"))}, "object_size"),
    ):
        with pytest.raises(ValueError, match=message):
            deformed_fashion_classification("train", 4, **kwargs)
    images, labels = torch.zeros(2, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(TypeError, match="images must be a uint8 tensor"):
        DeformedFashionClassification(images[0], labels)  # one image's rows taken for images
    with pytest.raises(ValueError, match="labels must be a tensor"):
        DeformedFashionClassification(images, torch.zeros(5))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):  # 0.5 became class 0
        DeformedFashionClassification(images, torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        DeformedFashionClassification(images, labels, channels=True)
    with pytest.raises(TypeError, match="transform must be None or a callable"):
        DeformedFashionClassification(images, labels, transform="resize")
    with pytest.raises(ValueError, match="split must be"):  # was: unhashable type: 'list'
        deformed_fashion_classification(["train"], 4)
    with pytest.raises(ValueError, match="split must be"):
        fashion_mnist.load_subset(["train"])


def test_damaged_classification_cache_is_regenerated(tmp_path):
    first = deformed_fashion_classification("val", 10, canvas_size=16, out_dir=tmp_path)
    (path,) = (tmp_path / "deformed_fashion_cls").glob("*.npz")
    for damage in (path.read_bytes()[:100], b""):  # was BadZipFile / EOFError on every later call
        path.write_bytes(damage)
        with pytest.warns(UserWarning, match="regenerating it"):
            again = deformed_fashion_classification("val", 10, canvas_size=16, out_dir=tmp_path)
        assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert len(deformed_fashion_classification("val", 10, canvas_size=16, out_dir=tmp_path)) == 10


def test_dataset_statistics_names_bad_input():
    with pytest.raises(ValueError, match="must be a COCO dict"):  # was KeyError: 'images'
        deformed_fashion.dataset_statistics({})
    orphan = {"image_id": 2, "area": 1.0, "bbox": [0, 0, 1, 1], "category_id": 1}
    data = {"images": [{"id": 1}], "annotations": [orphan], "categories": []}
    with pytest.raises(ValueError, match=r"annotations\[0\]: 'image_id' 2 is not in 'images'"):  # KeyError: 2
        deformed_fashion.dataset_statistics(data)
