"""Files a later run reads back survive an interruption at any moment: nothing half-written or stale
is taken as valid, and shared caches stay readable."""

from __future__ import annotations

import json
import os
import stat

import pytest

from deformable.data import deformed_fashion
from deformable.engine.checkpointing import atomic_save, atomic_write_text
from deformable.engine.demo import _pretraining_report


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_follow_the_umask_and_keep_a_replaced_files_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        text, tensor_file = (
            atomic_write_text("x", tmp_path / "a.json"),
            atomic_save({"a": 1}, tmp_path / "b.pth"),
        )
        assert _mode(text) == _mode(tensor_file) == 0o644  # mkstemp alone would leave 0o600
        text.chmod(0o640)
        atomic_write_text("y", text)
        assert _mode(text) == 0o640 and text.read_text() == "y"
    finally:
        os.umask(previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.pth"]  # no temporaries left


def test_a_cut_pretraining_report_is_ignored(tmp_path):
    weights = tmp_path / "resnet18.pth"
    report = weights.with_suffix(".json")
    report.write_text("")
    assert _pretraining_report(str(weights)) is None
    report.write_text(json.dumps({"iterations": 600, "top1_accuracy": 0.55}))
    assert _pretraining_report(str(weights))["iterations"] == 600


def test_forced_regeneration_killed_while_deleting_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    small = dict(num_train=2, num_val=1, canvas_size=64, object_size=(16, 32))
    paths = deformed_fashion.generate(tmp_path, **small)
    removing = deformed_fashion.shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        if path == paths.root:  # the old folder: delete its images, then "die"
            removing(path / "images")
            raise KeyboardInterrupt
        return removing(path, *args, **kwargs)

    monkeypatch.setattr(deformed_fashion.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        deformed_fashion.generate(tmp_path, force=True, **small)
    monkeypatch.undo()
    assert not deformed_fashion._is_complete(paths.root)
    again = deformed_fashion.generate(tmp_path, **small)  # regenerated, not trusted as it was
    assert deformed_fashion._is_complete(again.root) and any((again.root / "images").rglob("*.png"))


def test_an_interrupted_config_dump_leaves_the_old_file(tmp_path, monkeypatch):
    from deformable.engine.config import TrainConfig, dump_config, load_config

    path = tmp_path / "config.yaml"
    dump_config(TrainConfig(seed=1), path)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)  # the rename that publishes the new file never happens
    with pytest.raises(KeyboardInterrupt):
        dump_config(TrainConfig(seed=2), path)
    assert load_config(path).seed == 1 and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_the_umask_is_read_without_changing_it():
    """Reading the umask must not set it, even for a moment (other threads may be creating files)."""
    from deformable._files import _umask

    previous = os.umask(0o027)
    try:
        assert _umask() == 0o027
        assert os.umask(0o027) == 0o027  # still what it was
    finally:
        os.umask(previous)


def test_metrics_files_are_strict_json():
    """eval.json held bare NaN (a COCO metric without ground truth in its size range), which strict
    JSON parsers reject."""
    from deformable._files import strict_json

    metrics = {"bbox": {"AP": 0.5, "APm": float("nan"), "sizes": [1.0, float("inf")]}, "images": 3}
    text = strict_json(metrics)
    assert json.loads(text, parse_constant=pytest.fail) == {
        "bbox": {"AP": 0.5, "APm": None, "sizes": [1.0, None]},
        "images": 3,
    }
