"""Atomic writes: all or nothing, and ordinary permissions (not mkstemp's 0600)."""
import os

import pytest

from adaclip.io import atomic_path, write_json


def test_written_files_have_ordinary_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    write_json(tmp_path / "a.json", {"x": 1})
    assert (os.stat(tmp_path / "a.json").st_mode & 0o777) == 0o666 & ~umask


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    (tmp_path / "b.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "b.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["b.txt"]
