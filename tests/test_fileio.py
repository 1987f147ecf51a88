"""Atomic writes: a reader sees the old file or the whole new one; failures leave nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedllm.fileio import atomic_directory, atomic_path, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = write_text(tmp_path / "out.txt", "old")
    with pytest.raises(OSError, match="disk full"), atomic_path(target, durable=True) as temp:
        temp.write_text("half of the new")
        raise OSError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_durable_write_replaces_the_file(tmp_path: Path) -> None:
    target = write_text(tmp_path / "sub" / "out.txt", "old")
    write_text(target, "new", durable=True)
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_a_directory_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("weights failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as staging:
        (staging / "config.json").write_text("{}")
    assert [p.name for p in target.iterdir()] == ["config.json"]


def test_an_existing_directory_is_kept_or_replaced_as_asked(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "first").write_text("1")
    with atomic_directory(target) as staging:  # another writer finished first: theirs stays
        (staging / "second").write_text("2")
    assert [p.name for p in target.iterdir()] == ["first"]
    with atomic_directory(target, replace=True) as staging:
        (staging / "second").write_text("2")
    assert [p.name for p in target.iterdir()] == ["second"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_outputs_get_the_mode_the_umask_gives(tmp_path: Path) -> None:
    """Not mkstemp's 0600 or mkdtemp's 0700: a container running as another user reads what an operator wrote."""
    old = os.umask(0o022)
    try:
        file = write_text(tmp_path / "out.txt", "x")
        with atomic_directory(tmp_path / "model") as staging:
            (staging / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert file.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
