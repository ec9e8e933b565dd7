"""extract/files.py: every write goes to a temporary file and is renamed; links are replaced, never followed."""
from __future__ import annotations

import os

import pytest

from extract.files import UnsafePath, open_atomic, own_folder, write_text


def test_write_replaces_a_link_instead_of_following_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "summary.json"
    link.symlink_to(outside)
    write_text(link, "new")
    assert outside.read_text() == "keep"
    assert not link.is_symlink() and link.read_text() == "new"


def test_a_dangling_link_creates_nothing_where_it_points(tmp_path):
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "plot.png"
    link.symlink_to(tmp_path / "elsewhere.png")
    with open_atomic(link, "wb") as f:
        f.write(b"png")
    assert not (tmp_path / "elsewhere.png").exists() and link.read_bytes() == b"png"


def test_a_linked_folder_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "report").symlink_to(real)
    with pytest.raises(UnsafePath, match="symbolic link"):
        write_text(tmp_path / "report" / "report.md", "x")
    with pytest.raises(UnsafePath, match="symbolic link"):
        own_folder(tmp_path / "report")
    assert list(real.iterdir()) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with open_atomic(path) as f:
            f.write("half")
            raise RuntimeError
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.csv"]


def test_written_files_get_the_usual_permissions(tmp_path):
    write_text(tmp_path / "x", "y")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o666 & ~mask
