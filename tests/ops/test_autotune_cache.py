"""The autotune cache file: merging writers, scopes, and what it accepts."""

from __future__ import annotations

import json

import pytest

from deformable.ops._triton import _autotune_cache as cache  # pure Python: no Triton needed


@pytest.fixture
def path(monkeypatch, tmp_path):
    target = tmp_path / "autotune.json"
    monkeypatch.setenv(cache.CACHE_ENV, str(target))
    return target


def test_store_keeps_what_other_processes_wrote(path):
    cache.store("GPU A | triton 3", "k1", (64, 128, 32, 8, 3, 1))
    data = json.loads(path.read_text())
    data["scopes"]["GPU A | triton 3"]["k2"] = [32, 64, 16, 4, 2, 1]  # another process, meanwhile
    data["scopes"]["GPU B | triton 3"] = {"k1": [16, 16, 16, 4, 1, 1]}
    path.write_text(json.dumps(data))
    cache.store("GPU A | triton 3", "k3", (128, 128, 64, 8, 2, 3))
    assert cache.lookup("GPU A | triton 3", "k1") == (64, 128, 32, 8, 3, 1)
    assert cache.lookup("GPU A | triton 3", "k2") == (32, 64, 16, 4, 2, 1)
    assert cache.lookup("GPU A | triton 3", "k3") == (128, 128, 64, 8, 2, 3)
    assert cache.lookup("GPU B | triton 3", "k1") == (16, 16, 16, 4, 1, 1)
    assert cache.lookup("GPU B | triton 3", "k3") is None  # scopes do not mix
    cache.store("GPU A | triton 3", "k4", (64, 256, 64, 8, 1, 1, 1))  # with the go_first flag
    assert cache.lookup("GPU A | triton 3", "k4") == (64, 256, 64, 8, 1, 1, 1)
    cache.store("GPU A | triton 3", "k5", (64, 128, 32, 4, 1, 1, 2))  # the flat forward, channels inner
    assert cache.lookup("GPU A | triton 3", "k5") == (64, 128, 32, 4, 1, 1, 2)


@pytest.mark.parametrize(
    "entry",
    [
        [64, 128, 32, 8, 3],
        [64, 128, 32, 8, 3, 0],
        [64, 100, 32, 8, 3, 1],
        [64, 128, 32, 8, True, 1],
        [64, 128, 32, 8, 3, 1, 3],  # the variant is 0, 1 or 2
        [64, 128, 32, 8, 3, 1, False],
        [64, 128, 32, 8, 3, 1, 1, 1],
        [64, 128, 32, 3, 2, 1],  # 3 warps
        [64, 128, 32, 64, 2, 1],  # 64 warps
        "x",
    ],
)
def test_invalid_entries_are_ignored(path, entry):
    path.write_text(json.dumps({"format": 1, "scopes": {"s": {"k": entry}}}))
    with pytest.warns(UserWarning, match="invalid autotune cache entry"):
        assert cache.lookup("s", "k") is None


def test_an_unparseable_file_is_ignored_then_replaced(path):
    path.write_text("\x00garbage")
    with pytest.warns(UserWarning, match="unreadable autotune cache"):
        assert cache.lookup("s", "k") is None
    with pytest.warns(UserWarning, match="unreadable autotune cache"):
        cache.store("s", "k", (16, 16, 16, 4, 1, 1))
    assert cache.lookup("s", "k") == (16, 16, 16, 4, 1, 1)


@pytest.mark.parametrize("text", ["[1, 2]", '{"format": 2, "scopes": {}}'])
def test_another_format_is_neither_used_nor_overwritten(path, text):
    """Another version of the package may own the file: it is left as it is."""
    path.write_text(text)
    with pytest.warns(UserWarning, match="not format 1"):
        assert cache.lookup("s", "k") is None
    with pytest.warns(UserWarning, match="not format 1"):
        cache.store("s", "k", (16, 16, 16, 4, 1, 1))
    assert path.read_text() == text


def test_default_location_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_path() == tmp_path / "deformable" / "triton_autotune.json"
    monkeypatch.setenv(cache.CACHE_ENV, "   ")
    assert cache.cache_path() is None


def test_an_unwritable_cache_only_warns(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(cache.CACHE_ENV, str(blocker / "autotune.json"))  # its folder is a file
    with pytest.warns(UserWarning, match="could not write"):
        cache.store("s", "k", (16, 16, 16, 4, 1, 1))
