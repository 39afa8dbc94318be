"""The validation set is labelled as the training set was: a detector's label ``l`` is scored as the
category it was trained on, whatever categories the validation file lists."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from deformable.engine.config import load_config
from deformable.engine.trainer import build_datasets, build_val_dataset, evaluate, training_categories

from ..data.helpers import coco_dict, write_dataset

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _without_category(data: dict, cat_id: int) -> dict:
    data = copy.deepcopy(data)
    data["categories"] = [c for c in data["categories"] if c["id"] != cat_id]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != cat_id]
    return data


def _coco_config(tmp_path, val_data: dict | None, train_data: dict | None = None, *extra: str):
    train_images, train_json = write_dataset(tmp_path / "train", train_data)
    val_images, val_json = write_dataset(tmp_path / "val", val_data)
    return load_config(
        None,
        [
            "dataset=coco", f"train_images={train_images}", f"train_annotations={train_json}",
            f"val_images={val_images}", f"val_annotations={val_json}", "batch_size=1", "min_size=30",
            "max_size=40", *extra,
        ],
    )  # fmt: skip


class _Oracle(nn.Module):
    """A perfect detector trained on ``train``: the validation ground truth of image ``i`` (it is called
    on the images in order), its categories in the training set's labels, plus a detection of every
    category the validation file does not list."""

    def __init__(self, val, train) -> None:
        super().__init__()
        self.val, self.training_set, self.next = val, train, 0

    def forward(self, images):
        outputs = []
        for _ in images:
            _, target = self.val[self.next]
            self.next += 1
            cats = [self.val.label_to_cat_id[int(label)] for label in target["labels"]]
            labels = [self.training_set.cat_id_to_label[c] for c in cats]
            absent = [
                label for c, label in self.training_set.cat_id_to_label.items() if c not in self.val.coco.cats
            ]
            boxes = torch.cat(
                [target["boxes"], torch.tensor([[0.0, 0.0, 4.0, 4.0]] * len(absent)).reshape(-1, 4)]
            )
            labels_t = torch.tensor(labels + absent, dtype=torch.int64)
            outputs.append({"boxes": boxes, "labels": labels_t, "scores": torch.ones(len(labels_t))})
        return outputs


def test_validation_labels_follow_the_training_categories(tmp_path):
    """A validation file without one of training's categories (cat) took labels from its own list."""
    cfg = _coco_config(tmp_path, _without_category(coco_dict(), 3))
    train, val = build_datasets(cfg)
    assert val.cat_id_to_label == train.cat_id_to_label == {3: 1, 7: 2, 11: 3}
    metrics = evaluate(_Oracle(val, train), val, cfg, torch.device("cpu"))
    # Perfect detections score 1 (they scored 0: the dog, label 2, was read as the bird); the one of
    # the category the validation file lacks is left out (COCOeval scores the ground truth's only).
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["images"] == 2


def test_validation_categories_the_training_set_lacks_are_refused(tmp_path):
    cfg = _coco_config(tmp_path, None, _without_category(coco_dict(), 11))
    with pytest.raises(ValueError) as info:
        build_datasets(cfg)
    message = str(info.value)
    assert cfg.val_annotations in message and cfg.train_annotations in message and "[11]" in message


def test_the_validation_set_alone_takes_the_training_categories(tmp_path):
    cfg = _coco_config(tmp_path, _without_category(coco_dict(), 3))
    found = training_categories(cfg)  # from the training annotations file
    assert found is not None and found[1] == cfg.train_annotations
    assert build_val_dataset(cfg, *found).cat_id_to_label == {3: 1, 7: 2, 11: 3}
    stored = [{"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}, {"id": 12, "name": "fox"}]
    assert training_categories(cfg, stored) == (stored, cfg.train_annotations)  # a model file's first
    assert build_val_dataset(cfg, stored).cat_id_to_label == {7: 1, 11: 2, 12: 3}
    assert build_val_dataset(cfg).cat_id_to_label == {7: 1, 11: 2}  # its own list
    (tmp_path / "train" / "instances.json").unlink()
    assert training_categories(cfg) is None
    json.dumps(found[0])  # plain values: they go into the model files


def test_only_mask_models_load_masks(tmp_path):
    """Faster R-CNN's samples skip the segmentations (its evaluation reads the annotation file);
    Mask R-CNN's carry them."""
    cfg = _coco_config(tmp_path, None)
    train, val = build_datasets(cfg)
    assert cfg.model.startswith("fasterrcnn") and not train.has_masks and not val.has_masks
    assert "masks" not in train[0][1]
    cfg.model = "maskrcnn_resnet50_fpn_dcn"
    train, val = build_datasets(cfg)
    assert train.has_masks and val.has_masks and "masks" in train[0][1]


def test_training_drops_degenerate_boxes_and_validation_keeps_refusing_them(tmp_path):
    """COCO's train2017 has two boxes of height 0: training refused the stock annotations."""
    data = coco_dict()
    degenerate = {**data["annotations"][0], "id": 99, "bbox": [30.0, 20.0, 1.0, 0.0], "area": 0.0}
    data["annotations"].append(degenerate)
    cfg = _coco_config(tmp_path, None, data)
    with pytest.warns(UserWarning, match="dropped 1 annotation"):
        train, _ = build_datasets(cfg)
    assert 99 not in train.coco.anns and len(train.coco.anns) == len(data["annotations"]) - 1
    cfg = _coco_config(tmp_path / "bad_val", data)
    with pytest.raises(ValueError, match="degenerate 'bbox'"):
        build_datasets(cfg)


def test_mask_rcnn_needs_segmentations_before_training(tmp_path):
    """Validation annotations without a segmentation failed mask AP after the whole training run."""
    partial = coco_dict()
    partial["annotations"][0]["segmentation"] = []
    none = copy.deepcopy(partial)
    for ann in none["annotations"]:
        ann.pop("segmentation")
    mask_model = "model=maskrcnn_resnet50_fpn_dcn"
    cfg = _coco_config(tmp_path / "val", partial, None, mask_model)
    with pytest.raises(ValueError, match=r"1 annotation\(s\) lack a 'segmentation' in val_annotations"):
        build_datasets(cfg)
    cfg = _coco_config(tmp_path / "train_partial", None, partial, mask_model)  # a box stands in for one
    train, _ = build_datasets(cfg)
    assert train.has_masks
    cfg = _coco_config(tmp_path / "train_none", None, none, mask_model)
    with pytest.raises(ValueError, match="none of the annotations has a 'segmentation' in train_annotations"):
        build_datasets(cfg)
    build_datasets(_coco_config(tmp_path / "boxes", None, none))  # boxes alone: fine for Faster R-CNN
