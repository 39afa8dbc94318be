"""The workspace budget: set_memory_budget, memory_budget and DEFORMABLE_MEMORY_BUDGET_MB."""

from __future__ import annotations

import pytest
import torch

from deformable.ops import deform_conv2d, get_memory_budget, memory_budget, set_memory_budget

ENV = "DEFORMABLE_MEMORY_BUDGET_MB"


@pytest.fixture(autouse=True)
def _restore_budget(monkeypatch):
    """Every test starts from the default budget and leaves it so."""
    monkeypatch.delenv(ENV, raising=False)
    set_memory_budget(None)
    yield
    set_memory_budget(None)


def test_default_set_and_context_manager():
    assert get_memory_budget() == 256 * 2**20
    with memory_budget(4096):
        assert get_memory_budget() == 4096
    assert get_memory_budget() == 256 * 2**20
    set_memory_budget(1)
    assert get_memory_budget() == 1


@pytest.mark.parametrize(
    "value, error",
    [
        (True, TypeError),
        (False, TypeError),
        (1.5, TypeError),
        ("1024", TypeError),
        (0, ValueError),
        (-8, ValueError),
    ],
)
def test_set_memory_budget_rejects(value, error):
    with pytest.raises(error, match="num_bytes"):
        set_memory_budget(value)
    with pytest.raises(error, match="num_bytes"), memory_budget(value):
        pass
    assert get_memory_budget() == 256 * 2**20


@pytest.mark.parametrize("value, expected", [("1", 2**20), ("0.5", 2**19), (" 2 ", 2 * 2**20)])
def test_environment_budget(monkeypatch, value, expected):
    monkeypatch.setenv(ENV, value)
    assert get_memory_budget() == expected


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400", "0.0000001", "0", "-1", "lots"])
def test_bad_environment_budget_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=rf"{ENV} must be a positive finite number of MiB.*{value!r}"):
        get_memory_budget()


def test_bad_environment_budget_fails_operator_calls_with_the_same_error(monkeypatch):
    monkeypatch.setenv(ENV, "inf")
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=ENV):
        deform_conv2d(x, torch.zeros(1, 18, 4, 4), torch.randn(2, 2, 3, 3), padding=1, backend="aten")
