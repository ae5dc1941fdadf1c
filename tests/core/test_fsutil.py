"""Atomic writes: all or nothing, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from speculators_core.fsutil import atomic_directory, atomic_file


def test_atomic_file_and_directory_get_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "a.json") as tmp:
            tmp.write_text("{}")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "x").write_text("1")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_atomic_file_failure_leaves_the_old_file(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_atomic_directory_refuses_an_existing_target_unless_overwriting(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(FileExistsError), atomic_directory(tmp_path / "d"):
        pass
    with atomic_directory(tmp_path / "d", overwrite=True) as tmp:
        (tmp / "new").write_text("1")
    assert os.listdir(tmp_path / "d") == ["new"]
