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
