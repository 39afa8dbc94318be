"""Test-session set-up shared by every test module."""

from __future__ import annotations

import os

import pytest
import torch

# Triton decides at decoration time whether a kernel is compiled or interpreted, so the variable must be
# set before any Triton kernel module is imported. Without CUDA, every Triton test runs interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist workers share the cores: each gets its share of threads, so that they do not oversubscribe.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
torch.set_num_threads(max(1, min(2, _cores // _workers)))

# Autotuned configurations stay in memory: no test writes the user's cache (tests of the cache set
# their own file).
os.environ["DEFORMABLE_TRITON_AUTOTUNE_CACHE"] = ""


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
