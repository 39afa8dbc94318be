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
