"""Reading small files that someone else may have written (split files, summaries, histories, logs, a Flower
node's registration): only a regular file is read (a FIFO would block forever, /dev/zero never ends), never
more than a bound, and JSON whose nesting would exhaust the parser's stack is refused. Each problem is an
`Unreadable` (a ValueError) with one line; callers put it into their own message.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

MiB = 1 << 20


class Unreadable(ValueError):
    """A file that is not read: not a regular file, too large, or JSON nested too deeply."""


def read_bytes(path: str | Path, limit: int, *, tail: bool = False) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them: more is refused, or with `tail` only
    the last `limit` bytes are read (a log's last lines)."""
    name = Path(path).name
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable(f"{name} is not a regular file (a folder, FIFO or device is not read)")
        if st.st_size > limit:
            if not tail:
                raise Unreadable(f"{name} is larger than {limit} bytes ({st.st_size})")
            os.lseek(fd, st.st_size - limit, os.SEEK_SET)
        chunks, left = [], limit + 1  # one byte more: a file that grew while read is too large too
        while left > 0:
            chunk = os.read(fd, min(left, MiB))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        if not tail:
            raise Unreadable(f"{name} is larger than {limit} bytes")
        data = data[-limit:]
    return data


def read_text(path: str | Path, limit: int, *, tail: bool = False) -> str:
    """`read_bytes` as text (UTF-8; an undecodable byte becomes U+FFFD)."""
    return read_bytes(path, limit, tail=tail).decode("utf-8", errors="replace")


def loads(text: str | bytes) -> Any:
    """json.loads; JSON nested too deeply for the parser is an `Unreadable`, not a RecursionError. Other
    syntax errors stay json's ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise Unreadable("its JSON is nested too deeply (thousands of levels): not a file this tool wrote") from None


def read_json(path: str | Path, limit: int) -> Any:
    return loads(read_bytes(path, limit))
