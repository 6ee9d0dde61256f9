"""storage_schema.atomic: a failed write leaves the old version and no stray temp entry."""

import pytest

from storage_schema.atomic import atomic_path, atomic_write_text


def test_write_replaces_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "sub" / "a.json"
    atomic_write_text(dest, "one")
    atomic_write_text(dest, "two")
    assert dest.read_text() == "two"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    dest = tmp_path / "a.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_directory_swap(tmp_path):
    dest = tmp_path / "prior"
    with atomic_path(dest, directory=True) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "config.json").write_text("1")
    with atomic_path(dest, directory=True) as tmp:
        (tmp / "config.json").write_text("2")
    assert (dest / "config.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["prior"]
    with pytest.raises(ValueError), atomic_path(dest, directory=True) as tmp:
        (tmp / "config.json").write_text("3")
        raise ValueError
    assert (dest / "config.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["prior"]


def test_a_folder_gets_the_mode_any_folder_gets_under_the_umask(tmp_path):
    """An exported prior or a checkpoint is readable by whoever may read the user's other folders (umask 022:
    0755, files 0644), not by its owner only."""
    import os

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "prior", directory=True) as tmp:
            (tmp / "config.json").write_text("1")
        atomic_write_text(tmp_path / "file.json", "1")
    finally:
        os.umask(old)
    assert (tmp_path / "prior").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "prior" / "config.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "file.json").stat().st_mode & 0o777 == 0o644
