"""``run_demo(rows=...)`` / ``deformable demo --rows``: a subset of the table's rows, in table order."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deformable.engine import demo, trainer


@pytest.fixture
def fake_training(monkeypatch):
    """Replaces training by a record of which rows ran; each row reports its own AP."""
    ran = []

    def train(cfg, resume=True):
        ran.append((cfg.dcn, cfg.roi_pool, cfg.mimic))
        ap = 0.1 * len(ran)
        metrics = {"bbox": dict.fromkeys(demo.METRICS, ap), "inference_ms_per_image": 2.0}
        return SimpleNamespace(metrics=metrics, train_seconds=3.0, iterations=30, parameters=1_000_000)

    monkeypatch.setattr(trainer, "train", train)
    return ran


def test_rows_picks_a_subset_in_table_order(fake_training, tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("an earlier full report")
    demo.run_demo("smoke", out, ["progress=false"], rows=["mimic", "regular"])
    assert fake_training == [(None, "align", False), ("v2", "mdpool", True)]
    report = (out / "report_regular-mimic.md").read_text()
    assert "regular + RoIAlign" in report and "DCNv2 + mdpool + mimicking" in report
    assert "DCNv1" not in report and "DCNv2 (conv3-5) + mdpool" not in report
    assert (out / "results_regular-mimic.csv").read_text().count("\n") == 3  # header and two rows
    assert (out / "report.md").read_text() == "an earlier full report"  # kept, not overwritten
    assert not list(out.glob("training_curves*.png"))  # no row logged a loss: no empty figure


def test_every_row_by_default(fake_training, tmp_path):
    out = demo.run_demo("smoke", tmp_path / "demo", ["progress=false"])
    assert len(fake_training) == len(demo.ROWS) == len(demo.ROW_KEYS)
    assert (out / "report.md").exists() and (out / "results.csv").exists()


@pytest.mark.parametrize(
    "rows, error",
    [(["dcnv3"], ValueError), ([], ValueError), ("regular", TypeError), ([1], TypeError)],
)
def test_bad_rows_fail_before_any_training(fake_training, tmp_path, rows, error):
    with pytest.raises(error, match="rows must be"):
        demo.run_demo("smoke", tmp_path / "demo", rows=rows)
    assert fake_training == [] and not (tmp_path / "demo").exists()


def test_a_row_that_cannot_resume_says_how_to_restart(monkeypatch, tmp_path):
    """A row folder holding a checkpoint this version cannot resume (another version's optimizer
    grouping, another config) is an error that names ``--restart``; other errors pass unchanged."""

    def train(cfg, resume=True):
        raise ValueError("its optimizer state does not fit")

    monkeypatch.setattr(trainer, "train", train)
    with pytest.raises(ValueError, match=r"^its optimizer state does not fit$"):
        demo.run_demo("smoke", tmp_path, seeds=1, rows=["regular"])
    row = tmp_path / demo._slug(demo.select_rows(["regular"])[0][0]) / "seed0"
    row.mkdir(parents=True)
    (row / "checkpoint_last.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"does not fit\n`deformable demo --restart`"):
        demo.run_demo("smoke", tmp_path, seeds=1, rows=["regular"])
    with pytest.raises(ValueError, match=r"^its optimizer state does not fit$"):
        demo.run_demo("smoke", tmp_path, seeds=1, rows=["regular"], resume=False)
