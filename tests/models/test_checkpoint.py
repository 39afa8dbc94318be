"""Checkpoint import: state dicts laid out as mmdetection and detectron2 write them."""

from __future__ import annotations

import re

import pytest
import torch
from torchvision.models.resnet import Bottleneck

from deformable.models import load_checkpoint, maskrcnn_resnet50_fpn_dcn, read_state_dict, resnet18_dcn


def _model(seed: int, roi_pool: str = "mdpool"):
    torch.manual_seed(seed)
    pool_options = dict(branch="mmcv", hidden_channels=(32, 32), share_offset_branch=False)
    model = maskrcnn_resnet50_fpn_dcn(
        num_classes=4, backbone="resnet18", roi_pool=roi_pool,
        roi_pool_options=pool_options if roi_pool == "mdpool" else None,
        min_size=64, max_size=96, rpn_post_nms_top_n_test=20, box_detections_per_img=10,
    )  # fmt: skip
    with torch.no_grad():  # non-trivial offsets, so that a mis-mapped offset branch would show
        for name, p in model.named_parameters():
            if "conv_offset" in name or "offset_fc" in name or "mask_fc" in name:
                p.normal_(0, 0.01)
        # Distinctive background rows: a wrong class re-layout would change the scores.
        model.roi_heads.box_predictor.cls_score.bias[0] += 0.5
    return model.eval()


def _as_mmdet(state: dict) -> dict:
    """What mmdetection writes for the same network (written independently of the library's rules)."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = key
        new = re.sub(r"^backbone\.body\.", "backbone.", new)
        new = re.sub(r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.", r"neck.lateral_convs.\1.conv.", new)
        new = re.sub(r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.", r"neck.fpn_convs.\1.conv.", new)
        new = new.replace("rpn.head.conv.0.0.", "rpn_head.rpn_conv.")
        new = new.replace("rpn.head.cls_logits.", "rpn_head.rpn_cls.").replace(
            "rpn.head.bbox_pred.", "rpn_head.rpn_reg."
        )
        new = new.replace("roi_heads.box_head.fc6.", "roi_head.bbox_head.shared_fcs.0.")
        new = new.replace("roi_heads.box_head.fc7.", "roi_head.bbox_head.shared_fcs.1.")
        new = re.sub(r"^roi_heads\.box_roi_pool\.pools\.", "roi_head.bbox_roi_extractor.roi_layers.", new)
        new = re.sub(r"^roi_heads\.mask_roi_pool\.pools\.", "roi_head.mask_roi_extractor.roi_layers.", new)
        new = re.sub(r"^roi_heads\.mask_head\.(\d)\.0\.", r"roi_head.mask_head.convs.\1.conv.", new)
        new = new.replace("roi_heads.mask_predictor.conv5_mask.", "roi_head.mask_head.upsample.")
        if key.startswith("roi_heads.box_predictor.cls_score."):
            new, value = (
                key.replace("roi_heads.box_predictor.cls_score.", "roi_head.bbox_head.fc_cls."),
                torch.cat([value[1:], value[:1]]),
            )
        elif key.startswith("roi_heads.box_predictor.bbox_pred."):
            new, value = (
                key.replace("roi_heads.box_predictor.bbox_pred.", "roi_head.bbox_head.fc_reg."),
                value[4:],
            )
        elif key.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
            new = key.replace("roi_heads.mask_predictor.mask_fcn_logits.", "roi_head.mask_head.conv_logits.")
            value = value[1:]
        out[new] = value.clone()
    return {"meta": {"mmdet_version": "3.x"}, "state_dict": out}


def _as_detectron2(state: dict) -> dict:
    """What detectron2 writes for the same network (written independently of the library's rules)."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked") or "_roi_pool." in key:
            continue  # detectron2 has no deformable RoI pooling
        new = key
        new = re.sub(r"^backbone\.body\.conv1\.", "backbone.bottom_up.stem.conv1.", new)
        new = re.sub(r"^backbone\.body\.bn1\.", "backbone.bottom_up.stem.conv1.norm.", new)
        m = re.match(r"^backbone\.body\.layer(\d)\.(\d+)\.(.*)$", new)
        if m:
            rest = m[3]
            rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
            rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
            rest = rest.replace("conv2.conv_offset.", "conv2_offset.").replace(
                "conv1.conv_offset.", "conv1_offset."
            )
            new = f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.{rest}"
        new = re.sub(
            r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.", lambda x: f"backbone.fpn_lateral{int(x[1]) + 2}.", new
        )
        new = re.sub(
            r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.", lambda x: f"backbone.fpn_output{int(x[1]) + 2}.", new
        )
        new = new.replace("rpn.head.conv.0.0.", "proposal_generator.rpn_head.conv.")
        new = new.replace("rpn.head.cls_logits.", "proposal_generator.rpn_head.objectness_logits.")
        new = new.replace("rpn.head.bbox_pred.", "proposal_generator.rpn_head.anchor_deltas.")
        new = new.replace("roi_heads.box_head.fc6.", "roi_heads.box_head.fc1.").replace(
            "box_head.fc7.", "box_head.fc2."
        )
        new = re.sub(
            r"^roi_heads\.mask_head\.(\d)\.0\.",
            lambda x: f"roi_heads.mask_head.mask_fcn{int(x[1]) + 1}.",
            new,
        )
        new = new.replace("roi_heads.mask_predictor.conv5_mask.", "roi_heads.mask_head.deconv.")
        if key.startswith("roi_heads.box_predictor.cls_score."):
            value = torch.cat([value[1:], value[:1]])
        elif key.startswith("roi_heads.box_predictor.bbox_pred."):
            value = value[4:]
        elif key.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
            new, value = (
                key.replace("roi_heads.mask_predictor.mask_fcn_logits.", "roi_heads.mask_head.predictor."),
                value[1:],
            )
        out[new] = value.clone()
    return {"model": out, "__author__": "detectron2"}


def _outputs(model, images):
    with torch.no_grad():
        return model(images)


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        for key in ("boxes", "scores", "labels", "masks"):
            torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source, writer", [("mmdet", _as_mmdet), ("detectron2", _as_detectron2)])
def test_import_reproduces_outputs(source, writer, tmp_path):
    roi_pool = "mdpool" if source == "mmdet" else "align"  # detectron2 has no deformable RoI pooling
    original = _model(0, roi_pool)
    path = tmp_path / "checkpoint.pth"
    torch.save(writer(original.state_dict()), path)
    fresh = _model(1, roi_pool)
    report = load_checkpoint(fresh, path, source=source)
    assert not report.unexpected and not report.mismatched and not report.missing, str(report)
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    _assert_same(_outputs(fresh, images), _outputs(original, images))


def test_a_model_built_without_the_background_class_is_told_so(tmp_path):
    """An mmdetection head of 3 classes into a model of num_classes=3 (4 with the background): the
    score rows mismatch, and the regression and mask rows, of equal shapes, loaded shifted by one
    class without a word. They are re-laid out whatever the shapes, so they mismatch too."""
    state = _as_mmdet(_model(0, "align").state_dict())
    torch.manual_seed(1)
    short = maskrcnn_resnet50_fpn_dcn(num_classes=3, backbone="resnet18", roi_pool="align")
    report = load_checkpoint(short, state, source="mmdet")
    mismatched = {key.rsplit(".", 2)[-2] for key, _, _ in report.mismatched}
    assert mismatched == {"cls_score", "bbox_pred", "mask_fcn_logits"}, str(report)
    assert "roi_heads.box_predictor.bbox_pred.weight" in report.missing  # was loaded shifted


def test_torchvision_checkpoints_from_before_its_v2_heads(tmp_path):
    """torchvision's v1 detection weights name the RPN conv and the mask head's convs as before its
    Conv2dNormActivation heads; torchvision renames them when loading, which load_checkpoint skipped:
    the RPN conv and the four mask convs stayed random."""
    original = _model(0, "align")
    legacy = {}
    for key, value in original.state_dict().items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        key = re.sub(
            r"roi_heads\.mask_head\.(\d)\.0\.", lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.", key
        )
        legacy[key] = value
    assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn4.bias" in legacy
    fresh = _model(1, "align")
    report = load_checkpoint(fresh, legacy, source="torchvision")
    assert not report.unexpected and not report.mismatched and not report.missing, str(report)
    images = [torch.rand(3, 64, 80)]
    _assert_same(_outputs(fresh, images), _outputs(original, images))


def test_torchvision_backbone_weights_into_dcn_backbone(tmp_path):
    import torchvision

    plain = torchvision.models.resnet18()
    model = resnet18_dcn()
    report = load_checkpoint(model, plain.state_dict(), source="torchvision")
    assert not report.unexpected and all("conv_offset" in k for k in report.missing)
    assert torch.equal(model.layer4[1].conv2.weight, plain.layer4[1].conv2.weight)


def test_report_and_strict():
    model = resnet18_dcn()
    state = {"conv1.weight": torch.zeros(1), "bogus.weight": torch.zeros(3)}
    report = load_checkpoint(model, state)
    assert report.mismatched and report.unexpected == ["bogus.weight"]
    text = str(report)
    assert "bogus.weight" in text and "shape mismatch" in text
    with pytest.raises(ValueError, match="exactly"):
        load_checkpoint(model, state, strict=True)
    with pytest.raises(ValueError, match="source"):
        load_checkpoint(model, state, source="caffe")


def test_safetensors_and_bad_files(tmp_path):
    model = resnet18_dcn()
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(bad)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "absent.pth")
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    report = load_checkpoint(resnet18_dcn(), path)
    assert not report.missing and not report.unexpected


def test_corrupt_safetensors_is_a_value_error_naming_the_file(tmp_path):
    pytest.importorskip("safetensors")
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"definitely not safetensors")
    with pytest.raises(ValueError, match=r"corrupt\.safetensors"):
        read_state_dict(path)


@pytest.mark.parametrize("content", [{"a": 1}, {"model": {"epoch": 3}}, {}, [torch.zeros(1)]])
def test_file_without_tensors_is_an_error(tmp_path, content):
    path = tmp_path / "empty.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match=r"empty\.pth holds no state dict"):
        read_state_dict(path)


def test_wrapped_state_dict_is_unwrapped(tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "model": {"w": torch.ones(2), "note": "x"}}, path)
    assert list(read_state_dict(path)) == ["w"]


@pytest.mark.parametrize("bad", [5, None, b"model.pth", [("w", torch.ones(1))]])
def test_load_checkpoint_wants_a_path_or_a_state_dict(bad):
    with pytest.raises(TypeError, match=r"checkpoint path.*or a state dict"):
        load_checkpoint(torch.nn.Linear(2, 2), bad)


def test_load_checkpoint_wants_a_module():
    with pytest.raises(TypeError, match="model"):
        load_checkpoint({"w": torch.ones(1)}, {"w": torch.ones(1)})


def test_load_checkpoint_rejects_non_string_keys_and_sources():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"keys must be parameter names \(str\)"):
        load_checkpoint(model, {1: torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="source must be one of"):
        load_checkpoint(model, model.state_dict(), source=["mmdet"])


def test_detectron2_stride_layout():
    """detectron2's MSRA layout strides in the 1x1 conv: load_checkpoint warns while the model strides
    in the 3x3 conv, and move_stride_to_1x1 moves it (with the DCN offset branch) in place."""
    import warnings

    from deformable.models import move_stride_to_1x1, resnet50_dcn

    model = resnet50_dcn(dcn="v2")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
    stem = {"backbone.bottom_up.stem.conv1.weight": model.conv1.weight.detach().clone()}
    with pytest.warns(UserWarning, match="STRIDE_IN_1X1"):
        load_checkpoint(model, stem, source="detectron2")
    assert move_stride_to_1x1(model) is model
    for layer in (model.layer2, model.layer3, model.layer4):
        block = layer[0]
        assert tuple(block.conv1.stride) == (2, 2) and tuple(block.conv2.stride) == (1, 1)
        assert tuple(block.conv2.conv_offset.stride) == (1, 1)
        assert tuple(layer[1].conv1.stride) == (1, 1)
    with torch.no_grad():
        after = model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
    assert after.shape == before.shape and not torch.allclose(after, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(model, stem, source="detectron2")
    with pytest.raises(ValueError, match="must hold bottleneck blocks"):
        move_stride_to_1x1(resnet18_dcn())
    # detectron2's checkpoints are detectors': the whole model is given (its backbone.body is not a ResNet)
    from deformable.models import fasterrcnn_resnet50_c4_dcn, fasterrcnn_resnet50_fpn_dcn

    for builder in (fasterrcnn_resnet50_fpn_dcn, fasterrcnn_resnet50_c4_dcn):
        detector = move_stride_to_1x1(builder(num_classes=3, min_size=64, max_size=64))
        strided = [m for m in detector.modules() if isinstance(m, Bottleneck) and m.conv1.stride != (1, 1)]
        assert len(strided) >= 2 and all(tuple(m.conv2.stride) == (1, 1) for m in strided)
