"""Reading checkpoint files back: a missing, truncated, foreign or wrong-format file is a clear error."""

from __future__ import annotations

import pytest
import torch

from deformable._files import load_weights_only
from deformable.engine.checkpointing import FORMAT, load_training_checkpoint
from deformable.engine.loop import read_model_file


def _truncated(path):
    torch.save({"format": FORMAT, "model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])  # a process killed mid-write, without the atomic rename
    return path


@pytest.mark.parametrize("reader", [load_weights_only, load_training_checkpoint, read_model_file])
def test_missing_and_unreadable_files_raise_clear_errors(tmp_path, reader):
    with pytest.raises(FileNotFoundError, match=r"absent\.pth"):
        reader(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match=r"truncated\.pth is not a readable"):
        reader(_truncated(tmp_path / "truncated.pth"))
    foreign = tmp_path / "foreign.pth"
    torch.save({"w": torch.zeros(2), "f": _Foreign()}, foreign)  # an arbitrary Python object is not
    with pytest.raises(ValueError, match=r"foreign\.pth is not a readable"):
        reader(foreign)


class _Foreign:
    pass


def test_a_file_of_another_kind_is_named_as_such(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(2)}, other)
    assert set(load_weights_only(other)) == {"weights"}
    with pytest.raises(ValueError, match="not a deformable training checkpoint"):
        load_training_checkpoint(other)
    with pytest.raises(ValueError, match="holds no 'model' state dict"):
        read_model_file(other)


def test_incomplete_checkpoints_and_model_files_are_named(tmp_path):
    from deformable.engine.classifier import load_trained_classifier
    from deformable.engine.trainer import load_trained_model

    partial = tmp_path / "partial.pth"
    torch.save(
        {"format": FORMAT, "iteration": 3, "model": {}}, partial
    )  # was KeyError: 'optimizer' on resume
    with pytest.raises(ValueError, match=r"partial\.pth is an incomplete training checkpoint.*'optimizer'"):
        load_training_checkpoint(partial)
    listed = tmp_path / "listed.pth"
    torch.save({"model": [1, 2]}, listed)
    with pytest.raises(ValueError, match=r"listed\.pth holds no 'model' state dict"):
        read_model_file(listed)
    # were KeyError: 'config', KeyError: 'roi_heads.box_predictor.cls_score.weight', KeyError: 'fc.weight'
    with pytest.raises(ValueError, match="holds no 'config' mapping"):
        load_trained_model({"model": {}})
    weights_only = tmp_path / "weights.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "config": {}}, weights_only)
    with pytest.raises(ValueError, match=r"weights\.pth: the 'model' state dict has no 'roi_heads"):
        load_trained_model(weights_only)
    classifier = {"model": {"fc.weight": torch.zeros(3, 4)}, "config": {"task": "classification"}}
    with pytest.raises(ValueError, match=r"holds an image classifier .* load_trained_classifier"):
        load_trained_model(classifier)
    with pytest.raises(ValueError, match=r"holds a detector .* load_trained_model"):
        load_trained_classifier({"model": {}, "config": {}})
