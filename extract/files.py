"""Files the tool writes: each goes to a temporary file in its own folder and is renamed over its name, so
a kill never leaves half a file, and a symbolic link at that name is replaced, never followed (a rename
replaces the link itself). A folder the tool writes into must not be a link itself: `own_folder` refuses
one, so nothing lands outside the folders the tool was pointed at.

Writers raise `UnsafePath` (an OSError, so that every handler of file errors reports it in one line) with a
one-line message. `no_link` refuses a link where a file is opened in place (a log appended to).
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class UnsafePath(OSError):
    """A path the tool will not write through (a link, or a folder that is not a folder); str() is the message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def no_link(path: str | Path) -> Path:
    """`path`, refused when it is a symbolic link (a file opened in place, e.g. appended to, would be written
    through it) or when its folder is one."""
    path = Path(path)
    if path.is_symlink():
        raise UnsafePath(f"{path} is a symbolic link; the tool does not write through links: remove it, or give "
                         "another folder")
    if path.parent.is_symlink():
        own_folder(path.parent)
    return path


def own_folder(folder: str | Path) -> Path:
    """`folder`, created if missing; refused when it (the last component) is a symbolic link or not a folder."""
    folder = Path(folder)
    if folder.is_symlink():
        raise UnsafePath(f"{folder} is a symbolic link; the tool writes only into real folders: remove the link "
                         "or give another folder")
    if folder.exists() and not folder.is_dir():
        raise UnsafePath(f"{folder} is not a folder; remove it or give another folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def no_follow(path, flags: int) -> int:
    """An `opener` for open(): the file is opened only if it is not a symbolic link (O_NOFOLLOW)."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block ends without an error
    (and removed when it fails)."""
    path = Path(path)
    folder = own_folder(path.parent)
    if path.exists() and not path.is_symlink() and not path.is_file():
        raise UnsafePath(f"{path} exists and is not a regular file; remove it or give another name")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it (mkstemp makes it private)
    try:
        yield tmp
        os.replace(tmp, path)  # replaces a link at `path`, never writes through it
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def open_atomic(path: str | Path, mode: str = "w", **kwargs) -> Iterator:
    """`open(path, mode)` on a temporary file that replaces `path` when the block ends without an error."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
