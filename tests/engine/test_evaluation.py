"""COCO evaluation: ground truth scored as predictions gives AP 1, conversion of torchvision outputs,
accumulation over batches and across torch.distributed ranks."""

from __future__ import annotations

import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from pycocotools import mask as mask_utils

from deformable.data import CocoDetection, collate_detection, eval_transforms
from deformable.data.deformed_fashion import generate
from deformable.engine.evaluation import METRIC_NAMES, Evaluator, coco_evaluate, detections_to_coco

from ..data.helpers import coco_dict, write_dataset

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

GEN = dict(
    num_train=1,
    num_val=6,
    canvas_size=160,
    objects_per_image=(2, 4),
    object_size=(10, 128),
    size_weights=(1, 1, 1),
)


@pytest.fixture(scope="module")
def fashion_val(tmp_path_factory):
    paths = generate(tmp_path_factory.mktemp("cache"), seed=6, **GEN)  # seed 6: all size buckets
    return CocoDetection(paths.images("val"), paths.annotations("val"))


@pytest.fixture
def hand_written(tmp_path):
    images, ann_file = write_dataset(tmp_path)
    return CocoDetection(images, ann_file, include_crowd=True)


def _as_outputs(target, with_masks=True):
    """Perfect torchvision-style outputs for a target: its boxes and labels, score 1, masks [K, 1, H, W]."""
    out = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(len(target["labels"]))}
    if with_masks:
        out["masks"] = target["masks"][:, None].float()
    return out


def _perfect_predictions(ds, with_masks=True):
    outputs, ids = [], []
    for i in range(len(ds)):
        _, target = ds[i]
        outputs.append(_as_outputs(target, with_masks))
        ids.append(target["image_id"])
    return detections_to_coco(outputs, ids, ds.label_to_cat_id)


def _size_buckets(coco):
    return {"APs" if a["area"] < 32**2 else "APm" if a["area"] < 96**2 else "APl" for a in coco.anns.values()}


def test_ground_truth_scores_one_on_generated_data(fashion_val):
    assert _size_buckets(fashion_val.coco) == {"APs", "APm", "APl"}
    metrics = coco_evaluate(fashion_val.coco, _perfect_predictions(fashion_val))
    assert set(metrics) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert set(metrics[iou_type]) == set(METRIC_NAMES)
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert metrics[iou_type][name] == pytest.approx(1.0), (iou_type, name)


def test_ground_truth_scores_one_with_noncontiguous_categories(hand_written, capsys):
    ds = hand_written
    predictions = _perfect_predictions(ds)
    assert sorted({p["category_id"] for p in predictions}) == [3, 7, 11]  # labels mapped back to json ids
    first = predictions[0]
    assert first["bbox"] == [2.0, 3.0, 10.0, 6.0] and first["image_id"] == 1 and first["score"] == 1.0
    assert set(first["segmentation"]) == {"size", "counts"} and isinstance(
        first["segmentation"]["counts"], str
    )
    metrics = coco_evaluate(ds.coco, predictions, iou_types=("bbox", "segm"))
    assert capsys.readouterr().out == ""  # quiet by default
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert math.isnan(metrics[iou_type]["APl"])  # no large object: undefined, not -1
    coco_evaluate(ds.coco, predictions, iou_types=("bbox",), verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_imperfect_predictions_score_lower(fashion_val):
    predictions = _perfect_predictions(fashion_val)
    missing_one_image = [p for p in predictions if p["image_id"] != 1]
    metrics = coco_evaluate(fashion_val.coco, missing_one_image, iou_types=("bbox",))
    assert 0.0 < metrics["bbox"]["AP"] < 1.0
    # Scoring only the images that have predictions brings it back to 1.
    ids = sorted({p["image_id"] for p in missing_one_image})
    assert coco_evaluate(fashion_val.coco, missing_one_image, ("bbox",), img_ids=ids)["bbox"]["AP"] == 1.0
    shifted = [dict(p, bbox=[p["bbox"][0] + p["bbox"][2] / 2, *p["bbox"][1:]]) for p in predictions]
    assert coco_evaluate(fashion_val.coco, shifted, ("bbox",))["bbox"]["AP50"] < 0.5
    empty = coco_evaluate(fashion_val.coco, [], ("bbox", "segm"))
    assert empty["bbox"]["AP"] == 0.0 and empty["segm"]["AP"] == 0.0


def test_bad_predictions_raise(hand_written):
    ds = hand_written
    good = _perfect_predictions(ds)
    with pytest.raises(ValueError, match="image_id 99 is not in the ground truth"):
        coco_evaluate(ds.coco, [dict(good[0], image_id=99)])
    with pytest.raises(ValueError, match="category_id 1 is not in the ground truth"):
        coco_evaluate(ds.coco, [dict(good[0], category_id=1)])
    with pytest.raises(ValueError, match="iou_types"):
        coco_evaluate(ds.coco, good, iou_types=("keypoints",))
    boxes_only = [{k: v for k, v in p.items() if k != "segmentation"} for p in good]
    with pytest.raises(ValueError, match="'segmentation'; none has it"):
        coco_evaluate(ds.coco, boxes_only, iou_types=("segm",))
    with pytest.raises(ValueError, match="label 9 has no category id"):
        detections_to_coco(
            [{"boxes": torch.zeros(1, 4), "labels": torch.tensor([9]), "scores": torch.ones(1)}],
            [1],
            ds.label_to_cat_id,
        )


def test_malformed_predictions_and_arguments_are_named(hand_written):
    ds = hand_written
    good = _perfect_predictions(ds)
    for field, value, message in (  # were unpacking/float() errors, pycocotools TypeErrors or silent
        ("bbox", [1, 2, 3], r"predictions\[0\]: 'bbox' must be \[x, y, w, h\] of finite numbers"),
        ("bbox", [float("nan"), 0, 1, 1], "'bbox' must be"),  # scored as a miss
        ("score", float("nan"), r"predictions\[0\]: 'score' must be a finite number"),  # sorted anywhere
        ("image_id", [1], r"image_id \[1\] is not in the ground truth"),  # unhashable type: 'list'
        ("segmentation", [[2, 3, 12, 3, 12, 9]], "'segmentation' must be an RLE dict"),
        ("segmentation", {"size": [3, 4], "counts": "04"}, "size 3x4 .* does not match"),  # AP 0
    ):
        with pytest.raises(ValueError, match=message):
            coco_evaluate(ds.coco, [dict(good[0], **{field: value})])
    with pytest.raises(TypeError, match=r"coco_gt must be a pycocotools\.coco\.COCO"):
        coco_evaluate(coco_dict(), good)
    with pytest.raises(TypeError, match="iou_types must be a sequence"):  # was "got 'b'"
        Evaluator(ds.coco, ds.label_to_cat_id, "bbox")
    with pytest.raises(ValueError, match="mask_threshold must be a finite number"):  # every mask empty
        Evaluator(ds.coco, ds.label_to_cat_id, mask_threshold=float("nan"))
    out = {"boxes": torch.zeros(1, 4), "labels": torch.tensor([1]), "scores": torch.ones(1)}
    with pytest.raises(ValueError, match=r"image_sizes\[0\] must be \(height, width\)"):  # ZeroDivisionError
        detections_to_coco([out], [1], ds.label_to_cat_id, image_sizes=[(0, 0)], orig_sizes=[(30, 40)])
    with pytest.raises(ValueError, match=r"outputs\[0\]: 'boxes' must be \[K, 4\]"):  # a reshape error
        detections_to_coco([dict(out, boxes=torch.zeros(1, 3))], [1], ds.label_to_cat_id)
    with pytest.raises(TypeError, match=r"outputs\[0\]\['boxes'\] must be a Tensor"):
        detections_to_coco([dict(out, boxes=[[0, 0, 1, 1]])], [1], ds.label_to_cat_id)
    evaluator = Evaluator(ds.coco, ds.label_to_cat_id, ("bbox",))
    with pytest.raises(ValueError, match=r"targets\[0\] must be a dict with an 'image_id'"):  # KeyError
        evaluator.update([out], [{}])


def test_uncompressed_rle_predictions_are_scored(hand_written):
    """RLE with a list of run lengths passes the checks, so it must score as its compressed form (it
    was a TypeError from pycocotools' area())."""
    good = _perfect_predictions(hand_written)
    uncompressed = []
    for p in good:
        flat = mask_utils.decode(p["segmentation"]).flatten(order="F")
        bounds = np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]))
        runs = ([0] if flat[0] else []) + np.diff(bounds).tolist()
        uncompressed.append(dict(p, segmentation={"size": p["segmentation"]["size"], "counts": runs}))
    expected = coco_evaluate(hand_written.coco, good, ("segm",))
    assert coco_evaluate(hand_written.coco, uncompressed, ("segm",)) == expected


def test_mask_threshold_and_rescaling():
    outputs = [
        {
            "boxes": torch.tensor([[2.0, 4.0, 10.0, 8.0]]),
            "labels": torch.tensor([1]),
            "scores": torch.tensor([0.9]),
            "masks": torch.full((1, 1, 10, 20), 0.3).index_fill_(3, torch.arange(5), 0.8),
        }
    ]
    (res,) = detections_to_coco(outputs, [7], {1: 5}, mask_threshold=0.5)
    assert (
        res["category_id"] == 5 and res["bbox"] == [2.0, 4.0, 8.0, 4.0] and res["score"] == pytest.approx(0.9)
    )
    assert res["segmentation"]["size"] == [10, 20] and mask_utils.area(res["segmentation"]) == 50
    (res,) = detections_to_coco(outputs, [7], {1: 5}, mask_threshold=0.2)
    assert mask_utils.area(res["segmentation"]) == 200
    # Outputs for an image resized from 20x40 to 10x20 map back to the original size.
    (res,) = detections_to_coco(outputs, [7], {1: 5}, image_sizes=[(10, 20)], orig_sizes=[(20, 40)])
    assert res["bbox"] == [4.0, 8.0, 16.0, 8.0] and res["segmentation"]["size"] == [20, 40]
    assert mask_utils.area(res["segmentation"]) == 200
    # No detections: no results, and a sequence works as the label map too.
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
    }
    assert detections_to_coco([empty, dict(empty, masks=torch.zeros(0, 1, 10, 20))], [1, 2], [0, 5]) == []


def test_evaluator_over_resized_batches(fashion_val):
    ds = CocoDetection(fashion_val.root, fashion_val.ann_file, transforms=eval_transforms(min_size=100))
    evaluator = Evaluator(ds.coco, ds.label_to_cat_id, ("bbox", "segm"))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_detection)
    for images, targets in loader:
        assert images[0].shape[-2:] == (100, 100)
        evaluator.update([_as_outputs(t) for t in targets], targets)
    evaluator.update([_as_outputs(ds[0][1])], [ds[0][1]])  # an image seen twice counts once
    assert evaluator.num_images == len(ds)
    metrics = evaluator.compute()
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)  # boxes map back exactly
    assert metrics["segm"]["AP50"] == pytest.approx(1.0)  # masks went through a resize and back
    assert metrics["segm"]["AP"] > 0.5
    assert len(evaluator.results()) == len(ds.coco.anns)
    evaluator.reset()
    with pytest.raises(ValueError, match="before any update"):
        evaluator.compute()
    with pytest.raises(ValueError, match="no 'masks'"):
        evaluator.update([_as_outputs(ds[0][1], with_masks=False)], [ds[0][1]])
    boxes_only = Evaluator(ds.coco, ds.label_to_cat_id, ("bbox",))
    boxes_only.update([_as_outputs(ds[0][1], with_masks=False)], [ds[0][1]])
    assert set(boxes_only.compute()) == {"bbox"}


def test_evaluator_merges_ranks(fashion_val, monkeypatch):
    """The gather logic with torch.distributed faked in-process (the real thing runs in the next test)."""
    import torch.distributed as dist

    ds = fashion_val
    shards = [Evaluator(ds.coco, ds.label_to_cat_id) for _ in range(2)]
    for i in range(len(ds)):
        _, target = ds[i]
        shards[i % 2].update([_as_outputs(target)], [target])
    _, target = ds[0]
    shards[1].update([_as_outputs(target)], [target])  # a padded sampler repeats image 0 on rank 1
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(
        dist,
        "all_gather_object",
        lambda parts, obj: parts.__setitem__(slice(None), [obj, shards[1]._results]),
    )
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src: None)
    metrics = shards[0].compute()
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    assert len(shards[0].results()) == len(ds.coco.anns)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world: int, port: int, root: str, ann_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = CocoDetection(root, ann_file, check_images="none")
        evaluator = Evaluator(ds.coco, ds.label_to_cat_id, ("bbox", "segm"))
        # Like a padded DistributedSampler: rank r takes images r, r + 2, ...; rank 1 also repeats image 0.
        indices = list(range(rank, len(ds), world)) + ([0] if rank == 1 else [])
        for i in indices:
            _, target = ds[i]
            evaluator.update([_as_outputs(target)], [target])
        metrics = evaluator.compute()
        results = evaluator.results()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"metrics": metrics, "results": len(results), "local": evaluator.num_images}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_evaluator_gathers_across_ranks(fashion_val, tmp_path):
    port = _free_port()
    args = (2, port, str(fashion_val.root), str(fashion_val.ann_file), str(tmp_path))
    # fork: the children start with everything imported (spawn would re-import torch, twice).
    mp.start_processes(_distributed_worker, args=args, nprocs=2, join=True, start_method="fork")
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0]["metrics"] == reports[1]["metrics"]
    assert reports[0]["local"] + reports[1]["local"] == len(fashion_val) + 1
    assert reports[0]["results"] == reports[1]["results"] == len(fashion_val.coco.anns)
    for iou_type in ("bbox", "segm"):
        assert reports[0]["metrics"][iou_type]["AP"] == pytest.approx(1.0)
