"""What the engine builds: trained models reload from their own file alone, and the configured
training augmentation reaches the network."""

from __future__ import annotations

from pathlib import Path

import torch

from deformable.engine.config import load_config
from deformable.engine.trainer import FINAL_NAME, build_datasets, build_model, load_trained_model, train


def test_a_trained_model_loads_without_the_weights_it_started_from(smoke_overrides):
    """The final file holds every weight: evaluating it must not need the pre-training cache (or an
    ImageNet download) that training started from."""
    cfg = load_config("demo_smoke", [*smoke_overrides, "iterations=1", "checkpoint_every=1"])
    result = train(cfg, evaluate_at_end=False)
    start = Path(cfg.weights_backbone)  # training pointed this at the pre-trained backbone's cache
    assert start.is_file()
    hidden = start.rename(start.with_name(start.name + ".hidden"))
    try:
        model = load_trained_model(result.out_dir / FINAL_NAME)
    finally:
        hidden.rename(start)
    saved = torch.load(result.out_dir / FINAL_NAME, weights_only=True)["model"]
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[key], saved[key]) for key in saved)


def test_scale_jitter_reaches_the_network(smoke_overrides):
    """torchvision's detectors resize every image to min_size themselves; with scale jitter the
    training images must keep the jittered scales, and evaluation still uses min_size."""
    cfg = load_config("demo_smoke", [*smoke_overrides, "scale_jitter=[0.5, 1.5]"])
    train_set, _ = build_datasets(cfg)
    model = build_model(cfg, train_set.num_classes + 1)
    torch.manual_seed(0)
    images = [train_set[i][0] for i in range(8)]
    model.train()
    trained_sizes = {min(size) for size in model.transform(images)[0].image_sizes}
    assert len(trained_sizes) > 1 and trained_sizes == {min(image.shape[-2:]) for image in images}
    model.eval()
    assert {min(size) for size in model.transform(images)[0].image_sizes} == {cfg.min_size}


def test_configured_anchor_sizes_reach_the_rpn_of_both_layouts():
    """``anchor_sizes`` was ignored for the C4 layout (its RPN kept the paper's 32-512)."""
    from deformable.engine.trainer import anchor_generator

    sizes = [16, 32, 64, 128, 256]
    assert anchor_generator("fasterrcnn_resnet50_fpn_dcn", sizes).sizes == tuple((s,) for s in sizes)
    assert anchor_generator("maskrcnn_resnet50_c4_dcn", [8, 16]).sizes == ((8, 16),)
    cfg = load_config(
        None,
        ["model=fasterrcnn_resnet50_c4_dcn", "dcn=null", "roi_pool=align", "anchor_sizes=[8, 16, 32, 64]"],
    )
    model = build_model(cfg, 3)
    assert model.rpn.anchor_generator.sizes == ((8, 16, 32, 64),)
    assert model.rpn.head.cls_logits.out_channels == 4 * 3  # sizes x aspect ratios


def test_dpool_branch_widths_from_the_config():
    """roi_pool_hidden null builds the widths earlier runs were trained with (one hidden layer of 1024
    for dpool), so their model files load; [] builds the paper's single fc."""
    from deformable.engine.config import config_from_dict

    base = {"backbone": "resnet18", "dcn": "v1", "dcn_stages": [5], "roi_pool": "dpool", "num_classes": 3}
    widths = {}
    for hidden in (None, []):
        cfg = config_from_dict({**base, "roi_pool_hidden": hidden})
        pool = build_model(cfg, 4).roi_heads.box_roi_pool.pools[0]
        widths[str(hidden)] = [tuple(p.shape) for p in pool.offset_fc.parameters() if p.dim() == 2]
    assert widths["None"] == [(1024, 256 * 49), (98, 1024)]
    assert widths["[]"] == [(98, 256 * 49)]


def test_mask_rcnn_takes_a_custom_box_representation_size():
    """A representation_size other than 1024 gives torchvision a box predictor and no class count:
    Mask R-CNN then needs its mask predictor too (was a TypeError inside torchvision)."""
    for model_name in ("maskrcnn_resnet50_fpn_dcn", "maskrcnn_resnet50_c4_dcn"):
        overrides = [f"model={model_name}", "representation_size=512", "weights_backbone=null", "dcn=null"]
        model = build_model(load_config(None, overrides), 3)
        assert model.roi_heads.box_predictor.cls_score.in_features == 512
        assert model.roi_heads.box_predictor.cls_score.out_features == 3
        assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
