"""Shared fixtures for the training-engine tests: the smoke dataset generated once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A cache folder holding the smoke preset of deformed fashion (generated on first use)."""
    from deformable.data import deformed_fashion

    folder = tmp_path_factory.mktemp("deformed_fashion")
    deformed_fashion.load("train", out_dir=folder, preset="smoke")
    return folder


@pytest.fixture
def smoke_overrides(data_dir, tmp_path):
    """Overrides turning the smoke config into a quick, quiet, self-contained run."""
    return [f"data_dir={data_dir}", f"out_dir={tmp_path / 'run'}", "progress=false", "log_every=1"]
