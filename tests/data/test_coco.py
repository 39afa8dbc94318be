"""CocoDetection on a hand-written json: targets, category mapping, annotation errors, transforms, collate."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from deformable.data import (
    AnnotationError,
    CocoDetection,
    check_coco_annotations,
    collate_detection,
    eval_transforms,
    train_transforms,
)
from deformable.data.coco import _decode_rle_string

from .helpers import coco_dict, square_mask, write_dataset


@pytest.fixture
def dataset_files(tmp_path):
    return write_dataset(tmp_path)


def test_targets_and_category_mapping(dataset_files):
    images, ann_file = dataset_files
    ds = CocoDetection(images, ann_file)
    assert len(ds) == 2 and ds.ids == [1, 2]
    assert ds.num_classes == 3 and ds.has_masks
    assert ds.cat_id_to_label == {3: 1, 7: 2, 11: 3}
    assert ds.label_to_cat_id == {1: 3, 2: 7, 3: 11}
    assert ds.class_names == ("__background__", "cat", "dog", "bird")

    image, target = ds[0]
    pixels = np.array(Image.open(images / "a.png"))
    assert image.dtype == torch.float32 and image.shape == (3, 30, 40)
    assert torch.equal((image * 255).round().to(torch.uint8), torch.from_numpy(pixels).permute(2, 0, 1))
    assert type(target["boxes"]) is torch.Tensor and target["boxes"].dtype == torch.float32
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 9.0], [20.0, 10.0, 35.0, 22.0]]))
    assert torch.equal(target["labels"], torch.tensor([1, 3]))
    assert target["labels"].dtype == torch.int64
    assert target["image_id"] == 1
    assert torch.equal(target["area"], torch.tensor([60.0, 180.0]))
    assert torch.equal(target["iscrowd"], torch.tensor([0, 0]))
    assert torch.equal(target["orig_size"], torch.tensor([30, 40])) and torch.equal(
        target["size"], target["orig_size"]
    )
    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (2, 30, 40)
    assert torch.equal(masks[1], torch.from_numpy(square_mask(30, 40, 10, 20, 22, 35)))
    # The polygon rectangle (2, 3)-(12, 9) rasterises inside its box and covers its interior.
    ys, xs = torch.nonzero(masks[0], as_tuple=True)
    assert xs.min() >= 2 and xs.max() <= 12 and ys.min() >= 3 and ys.max() <= 9
    assert masks[0, 4:9, 3:12].all()


def test_crowd_annotations(dataset_files):
    images, ann_file = dataset_files
    _, target = CocoDetection(images, ann_file)[1]
    assert torch.equal(target["labels"], torch.tensor([2]))  # the crowd 'cat' is left out for training
    assert target["masks"].shape == (1, 25, 20)
    _, target = CocoDetection(images, ann_file, include_crowd=True)[1]
    assert torch.equal(target["labels"], torch.tensor([2, 1]))
    assert torch.equal(target["iscrowd"], torch.tensor([0, 1]))


def test_image_without_annotations_and_remove_empty(tmp_path):
    data = coco_dict()
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 1]
    images, ann_file = write_dataset(tmp_path, data)
    ds = CocoDetection(images, ann_file)
    _, target = ds[1]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 25, 20)
    assert CocoDetection(images, ann_file, remove_empty=True).ids == [1]


def test_masks_false_leaves_the_masks_out(dataset_files):
    """A box-only detector's samples skip decoding the segmentations; boxes and labels are unchanged."""
    images, ann_file = dataset_files
    with_masks, without = CocoDetection(images, ann_file), CocoDetection(images, ann_file, masks=False)
    assert with_masks.has_masks and not without.has_masks
    (_, full), (_, boxes_only) = with_masks[0], without[0]
    assert "masks" in full and "masks" not in boxes_only
    assert all(torch.equal(full[k], boxes_only[k]) for k in ("boxes", "labels", "area", "iscrowd"))
    with pytest.raises(TypeError, match="masks must be a bool"):
        CocoDetection(images, ann_file, masks="no")


def test_boxes_only_dataset_has_no_masks(tmp_path):
    data = coco_dict()
    for a in data["annotations"]:
        del a["segmentation"]
        del a["area"]  # filled in from the box
    images, ann_file = write_dataset(tmp_path, data)
    ds = CocoDetection(images, ann_file)
    assert not ds.has_masks
    _, target = ds[0]
    assert "masks" not in target
    assert torch.equal(target["area"], torch.tensor([60.0, 180.0]))


def _break(mutate):
    data = coco_dict()
    mutate(data)
    return data


def _resize_image_2(data):
    data["images"][1]["height"] = 26
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 1]


BAD = {
    "degenerate box": (
        lambda d: d["annotations"][0].update(bbox=[2.0, 3.0, 0.0, 6.0]),
        r"annotations\[0\] \(id 10\): degenerate 'bbox'",
    ),
    "negative height": (
        lambda d: d["annotations"][2].update(bbox=[5.0, 4.0, 8.0, -1.0]),
        "degenerate 'bbox'",
    ),
    "unknown category": (lambda d: d["annotations"][1].update(category_id=99), "unknown 'category_id' 99"),
    "unknown image": (lambda d: d["annotations"][1].update(image_id=5), "'image_id' 5 is not in 'images'"),
    "box outside": (
        lambda d: d["annotations"][1].update(bbox=[30.0, 10.0, 15.0, 12.0]),
        "lies outside its image",
    ),
    "bad bbox": (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), "'bbox' must be"),
    "rle size": (
        lambda d: d["annotations"][2]["segmentation"].update(size=[20, 25]),
        "does not match the image",
    ),
    "bad polygon": (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]]), "polygon"),
    "odd polygon": (
        lambda d: d["annotations"][0].update(segmentation=[[2, 3, 12, 3, 12, 9, 2]]),
        r"annotations\[0\] \(id 10\): 'segmentation'\[0\] must be a polygon",
    ),
    "text in polygon": (
        lambda d: d["annotations"][0].update(segmentation=[[2, 3, 12, 3, 12, "9"]]),
        r"annotations\[0\] \(id 10\): 'segmentation'\[0\] holds a non-numeric",
    ),
    "rle size as text": (
        lambda d: d["annotations"][2]["segmentation"].update(size=["25", "20"]),
        r"annotations\[2\] \(id 12\): RLE 'segmentation' needs 'size'.*two non-negative integers",
    ),
    "rle string overflows": (  # one more run than the image has pixels: pycocotools' "Invalid RLE mask"
        lambda d: d["annotations"][2]["segmentation"].update(counts="Q49`00000000000000[55"),
        r"annotations\[2\] \(id 12\): RLE 'segmentation' 'counts' cover 514 pixels, not .* 25x20 = 500",
    ),
    "rle string too short": (  # pycocotools would decode it into uninitialised memory
        lambda d: d["annotations"][2]["segmentation"].update(counts="Q49"),
        r"annotations\[2\] \(id 12\): RLE 'segmentation' 'counts' cover 138 pixels",
    ),
    "rle string truncated": (
        lambda d: d["annotations"][1]["segmentation"].update(counts="Rc0<b0000000000000000000000000000\\"),
        r"annotations\[1\] \(id 11\): RLE 'segmentation' 'counts' is not a valid compressed RLE string",
    ),
    "rle string characters": (
        lambda d: d["annotations"][2]["segmentation"].update(counts="Q49`000000000000 00[5"),
        r"\(id 12\): RLE 'segmentation' 'counts' is not a valid compressed RLE string",
    ),
    "rle negative run": (
        lambda d: d["annotations"][2]["segmentation"].update(counts=[-5, 5]),
        r"annotations\[2\] \(id 12\): RLE 'segmentation' 'counts' must be a list of non-negative integer",
    ),
    "rle text runs": (
        lambda d: d["annotations"][3]["segmentation"].update(counts=["a", "b"]),
        r"annotations\[3\] \(id 13\): RLE 'segmentation' 'counts' must be a list of non-negative integer",
    ),
    "rle runs short": (
        lambda d: d["annotations"][2]["segmentation"].update(counts=[100, 300]),
        r"\(id 12\): RLE 'segmentation' 'counts' cover 400 pixels, not the image's 25x20 = 500",
    ),
    "rle no counts": (lambda d: d["annotations"][2]["segmentation"].pop("counts"), "needs 'counts'"),
    "duplicate ann id": (lambda d: d["annotations"][1].update(id=10), "duplicate id"),
    # json lists are unhashable: the set/dict lookups raised a bare "unhashable type: 'list'"
    "category id list": (
        lambda d: d["annotations"][1].update(category_id=[11]),
        r"annotations\[1\] \(id 11\): unknown 'category_id' \[11\]",
    ),
    "image id list": (
        lambda d: d["annotations"][1].update(image_id=[1]),
        r"annotations\[1\] \(id 11\): 'image_id' \[1\] is not in 'images'",
    ),
    "no width": (lambda d: d["images"][0].pop("width"), r"images\[0\] \(id 1\): 'width'"),
    "no categories": (lambda d: d.pop("categories"), "'categories' must be a list"),
    "image size": (_resize_image_2, "the file is 20x25 .* 'height' 26"),
    "missing image": (
        lambda d: d["images"][1].update(file_name="sub/missing.png"),
        "missing.png' does not exist",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_annotations_raise(tmp_path, case):
    mutate, message = BAD[case]
    images, ann_file = write_dataset(tmp_path, _break(mutate))
    with pytest.raises(AnnotationError, match=message) as info:
        CocoDetection(images, ann_file)
    assert str(ann_file) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_uncompressed_rle_gives_the_same_mask(tmp_path):
    data = coco_dict()
    mask = square_mask(25, 20, 4, 5, 13, 13)
    data["annotations"][2]["segmentation"] = {"size": [25, 20], "counts": _runs(mask)}
    images, ann_file = write_dataset(tmp_path, data)
    _, target = CocoDetection(images, ann_file)[1]
    assert torch.equal(target["masks"][0], torch.from_numpy(mask))


def _runs(mask: np.ndarray) -> list[int]:
    """The uncompressed RLE counts of a 0/1 mask: alternating runs of 0s and 1s, column by column."""
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], edges, [flat.size]))
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def test_compressed_rle_strings_read_as_pycocotools_writes_them():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = rng.integers(1, 60, size=2)
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if rng.random() < 0.5:  # long runs, which take several characters each
            mask[: h // 2] = 1
        counts = mask_utils.encode(np.asfortranarray(mask))["counts"]
        assert _decode_rle_string(counts).tolist() == _runs(mask)
        assert _decode_rle_string(counts.decode()).tolist() == _runs(mask)
    assert _decode_rle_string("").tolist() == []
    assert _decode_rle_string("ooooooo0") is None  # a number longer than a run length can be
    assert _decode_rle_string("0é") is None


def test_invalid_json_and_missing_files(tmp_path):
    images, ann_file = write_dataset(tmp_path)
    ann_file.write_text('{"images": [}')
    with pytest.raises(AnnotationError, match=r"instances.json: invalid json at line 1"):
        CocoDetection(images, ann_file)
    ann_file.write_text("[]")
    with pytest.raises(AnnotationError, match="top level must be a json object"):
        CocoDetection(images, ann_file)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        CocoDetection(images, tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="root="):
        CocoDetection(tmp_path / "no_images", ann_file)


def test_corrupt_image(tmp_path):
    images, ann_file = write_dataset(tmp_path)
    (images / "a.png").write_bytes(b"not a png")
    with pytest.raises(AnnotationError, match=r"a\.png' cannot be read"):
        CocoDetection(images, ann_file)
    # Without the up-front check the error comes when the image is loaded, naming it just the same.
    ds = CocoDetection(images, ann_file, check_images="exists")
    with pytest.raises(AnnotationError, match="image id 1: cannot read"):
        ds[0]


def test_size_mismatch_found_at_load_time_without_checks(tmp_path):
    data = coco_dict()
    _resize_image_2(data)
    images, ann_file = write_dataset(tmp_path, data)
    ds = CocoDetection(images, ann_file, check_images="none")
    ds[0]
    with pytest.raises(AnnotationError, match=r"b\.png' is 20x25 .* 'height' 26"):
        ds[1]


def test_errors_are_collected(tmp_path):
    data = coco_dict()
    for a in data["annotations"]:
        a["category_id"] = 42
    images, ann_file = write_dataset(tmp_path, data)
    with pytest.raises(AnnotationError, match="4 annotation problem"):
        CocoDetection(images, ann_file)


def test_drop_degenerate(tmp_path):
    data = coco_dict()
    data["annotations"][0]["bbox"] = [2.0, 3.0, 0.0, 6.0]
    images, ann_file = write_dataset(tmp_path, data)
    with pytest.warns(UserWarning, match="dropped 1 annotation"):
        ds = CocoDetection(images, ann_file, drop_degenerate=True)
    _, target = ds[0]
    assert torch.equal(target["labels"], torch.tensor([3]))
    assert 10 not in ds.coco.anns


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy pixel boxes of masks [K, H, W] (x2, y2 exclusive)."""
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


def test_flip_keeps_boxes_and_masks_consistent(dataset_files):
    images, ann_file = dataset_files
    plain = CocoDetection(images, ann_file)
    flipped = CocoDetection(images, ann_file, transforms=train_transforms(hflip_prob=1.0))
    for i in range(len(plain)):
        image, target = plain[i]
        f_image, f_target = flipped[i]
        assert torch.equal(f_image, image.flip(-1))
        assert torch.equal(f_target["masks"], target["masks"].flip(-1))
        W = image.shape[-1]
        expected = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
            [W, 0, W, 0]
        )
        assert torch.allclose(f_target["boxes"], expected)
        # Boxes of the rectangle masks (image 1 box 2, image 2) stay the masks' tight boxes.
        assert torch.equal(_mask_boxes(f_target["masks"])[-1], f_target["boxes"][-1])
        assert torch.equal(f_target["labels"], target["labels"])


def test_resize_keeps_boxes_and_masks_consistent(dataset_files):
    images, ann_file = dataset_files
    torch.manual_seed(0)
    ds = CocoDetection(
        images, ann_file, transforms=train_transforms(min_size=(60, 90), max_size=100, hflip_prob=0.0)
    )
    seen = set()
    for _ in range(6):
        for i in range(len(ds)):
            image, target = ds[i]
            H, W = image.shape[-2:]
            H0, W0 = target["orig_size"].tolist()
            seen.add((i, H, W))
            assert min(H, W) in (60, 90) or max(H, W) == 100
            assert torch.equal(target["size"], torch.tensor([H, W]))
            assert target["masks"].shape[-2:] == (H, W)
            rect = target["boxes"][-1]  # a rectangle mask: its box must match the resized mask's box
            assert torch.allclose(_mask_boxes(target["masks"])[-1], rect, atol=1.0)
            scale = torch.tensor([W / W0, H / H0, W / W0, H / H0])
            raw = CocoDetection(images, ann_file)[i][1]["boxes"]
            assert torch.allclose(target["boxes"], raw * scale, atol=1e-4)
    assert len(seen) > 2  # the scale jitter drew several sizes


def test_eval_transforms_resize(dataset_files):
    images, ann_file = dataset_files
    dataset = CocoDetection(images, ann_file, transforms=eval_transforms(min_size=60))
    state = torch.random.get_rng_state()
    image, target = dataset[0]
    # The resize drew its (single) size from the global generator: evaluating moved training's stream.
    assert torch.equal(torch.random.get_rng_state(), state)
    assert image.shape == (3, 60, 80) and image.dtype == torch.float32
    assert torch.allclose(target["boxes"][0], torch.tensor([4.0, 6.0, 24.0, 18.0]))
    with pytest.raises(ValueError, match="single min_size"):
        eval_transforms(min_size=[60, 70])
    with pytest.raises(ValueError, match="max_size needs min_size"):
        train_transforms(max_size=100)
    with pytest.raises(ValueError, match="min_size"):
        train_transforms(min_size=[0])
    for bad in (5.5, "160"):  # were "'float' object is not iterable" / split into characters
        with pytest.raises(ValueError, match="min_size must be a positive int"):
            eval_transforms(min_size=bad)
    for bad in ("a", None, True, 1.5):
        with pytest.raises(ValueError, match="hflip_prob"):
            train_transforms(hflip_prob=bad)


def test_collate_and_dataloader(dataset_files):
    images, ann_file = dataset_files
    ds = CocoDetection(images, ann_file)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_detection)
    batch_images, batch_targets = next(iter(loader))
    assert [im.shape for im in batch_images] == [(3, 30, 40), (3, 25, 20)]
    assert [t["image_id"] for t in batch_targets] == [1, 2]


def test_hand_written_json_is_not_modified(dataset_files):
    images, ann_file = dataset_files
    before = json.loads(ann_file.read_text())
    ds = CocoDetection(images, ann_file)
    ds[0]
    assert json.loads(ann_file.read_text()) == before == coco_dict()
    assert copy.deepcopy(ds.coco.dataset["categories"]) == coco_dict()["categories"]


def test_bad_arguments_are_named(dataset_files):
    images, ann_file = dataset_files
    with pytest.raises(TypeError, match="data must be a dict"):  # was AttributeError: 'list' ... 'get'
        check_coco_annotations([])
    with pytest.raises(TypeError, match="transforms must be None or a callable"):
        CocoDetection(images, ann_file, "flip")
    ds = CocoDetection(images, ann_file, lambda image, target: image)  # forgot to return the target
    with pytest.raises(TypeError, match=r"transforms must return \(image, target\)"):
        ds[0]


def _without_category(data: dict, cat_id: int) -> dict:
    """The json without category ``cat_id`` and its annotations (a split that lacks one category)."""
    data = copy.deepcopy(data)
    data["categories"] = [c for c in data["categories"] if c["id"] != cat_id]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != cat_id]
    return data


def test_a_split_labels_its_objects_as_the_training_split_does(tmp_path):
    """A validation file that lists fewer categories than the training file took labels from its own
    list (dog 1, bird 2 where training had cat 1, dog 2, bird 3): a detector's labels were scored as
    other categories."""
    train = CocoDetection(*write_dataset(tmp_path / "train"))
    val = CocoDetection(*write_dataset(tmp_path / "val", _without_category(coco_dict(), 3)))
    assert val.cat_id_to_label == {7: 1, 11: 2}  # its own list, before
    assert train.categories == [
        {"id": 3, "name": "cat"},
        {"id": 7, "name": "dog"},
        {"id": 11, "name": "bird"},
    ]
    val.use_categories(train.categories, train.ann_file)
    assert val.cat_id_to_label == train.cat_id_to_label and val.label_to_cat_id == train.label_to_cat_id
    assert val.class_names == train.class_names and val.num_classes == 3
    assert val.categories == train.categories
    assert torch.equal(val[0][1]["labels"], torch.tensor([3]))  # the bird, labelled as in training
    assert torch.equal(val[1][1]["labels"], torch.tensor([2]))  # the dog


def test_a_split_with_categories_the_training_split_lacks_is_refused(tmp_path):
    train = CocoDetection(*write_dataset(tmp_path / "train", _without_category(coco_dict(), 11)))
    val = CocoDetection(*write_dataset(tmp_path / "val"))
    with pytest.raises(ValueError) as info:
        val.use_categories(train.categories, train.ann_file)
    message = str(info.value)
    assert str(val.ann_file) in message and str(train.ann_file) in message and "[11]" in message
    assert val.cat_id_to_label == {3: 1, 7: 2, 11: 3}  # unchanged
    with pytest.raises(ValueError, match=r"categories\[0\] must be a dict with an int 'id'"):
        val.use_categories([{"id": "3", "name": "cat"}], "train.json")


@pytest.mark.parametrize("mode", ["16-bit", "32-bit", "float", "unit float", "gray", "palette"])
def test_images_of_any_pil_mode_load_as_rgb_bytes(tmp_path, mode):
    """A 16-bit PNG went through PIL's RGB conversion, which clips: almost every pixel became 255."""
    images, ann_file = write_dataset(tmp_path)
    h, w = 30, 40  # image 1
    ramp = np.linspace(0, 1, h * w).reshape(h, w)
    if mode == "16-bit":
        Image.fromarray(np.rint(ramp * 65535).astype(np.uint16)).save(images / "a.png")
    elif mode == "32-bit":
        Image.fromarray(np.rint(ramp * 65535).astype(np.int32), mode="I").save(images / "a.tiff")
    elif mode == "float":
        Image.fromarray((ramp * 65535).astype(np.float32), mode="F").save(images / "a.tiff")
    elif mode == "unit float":
        Image.fromarray(ramp.astype(np.float32), mode="F").save(images / "a.tiff")
    elif mode == "gray":
        Image.fromarray(np.rint(ramp * 255).astype(np.uint8)).save(images / "a.png")
    else:
        Image.fromarray(np.rint(ramp * 255).astype(np.uint8)).convert("P").save(images / "a.png")
    if mode in ("32-bit", "float", "unit float"):
        data = coco_dict()
        data["images"][0]["file_name"] = "a.tiff"
        ann_file.write_text(json.dumps(data))
    image = CocoDetection(images, ann_file).load_image(1)
    assert image.shape == (3, h, w) and image.dtype == torch.uint8
    expected = torch.from_numpy(np.rint(ramp * 255)).to(torch.uint8)
    assert (image[0].int() - expected.int()).abs().max() <= 1  # the palette may round
    assert torch.equal(image[0], image[2])


def test_images_whose_values_no_scale_fits_are_named(tmp_path):
    images, ann_file = write_dataset(tmp_path)
    Image.fromarray(np.full((30, 40), 100000, dtype=np.int32), mode="I").save(images / "a.tiff")
    data = coco_dict()
    data["images"][0]["file_name"] = "a.tiff"
    ann_file.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"image id 1: cannot read .* outside 0..65535"):
        CocoDetection(images, ann_file).load_image(1)
