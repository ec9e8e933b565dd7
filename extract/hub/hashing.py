"""sha256 beside the work: export and import hash every byte twice (the cache's datasets and the Parquet
files), which costs as much as writing them. One background thread takes the hash updates in the order
they are given (hashlib releases the GIL on large buffers), so hashing overlaps reading, encoding and
writing; the data waiting to be hashed is bounded.
"""
from __future__ import annotations

import hashlib
import io
from collections import deque
from concurrent.futures import ThreadPoolExecutor

MAX_PENDING = 64 * 2**20  # bytes queued for hashing before the caller waits


class StringHash:
    """`strings_sha256` (the strings joined by newlines, UTF-8) fed block by block."""

    def __init__(self):
        self.sha, self.started = hashlib.sha256(), False

    def chunk(self, strings) -> bytes:
        """The bytes `strings` add (call in order)."""
        if not len(strings):
            return b""
        data = (("\n" if self.started else "") + "\n".join(strings)).encode()
        self.started = True
        return data

    def update(self, data: bytes) -> None:
        self.sha.update(data)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


class Background:
    """Hash updates run in order on one thread; `wait()` returns when all are done (and re-raises)."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fedclip-sha256")
        self.pending: deque = deque()
        self.bytes = 0

    def update(self, sha, data) -> None:
        """`sha.update(data)` after the earlier updates; `data` must not change until it is done."""
        size = memoryview(data).nbytes
        self.pending.append((self.pool.submit(sha.update, data), size))
        self.bytes += size
        while self.bytes > MAX_PENDING or (self.pending and self.pending[0][0].done()):
            future, size = self.pending.popleft()
            future.result()
            self.bytes -= size

    def strings(self, sha: StringHash, strings) -> None:
        data = sha.chunk(strings)
        if data:
            self.update(sha, data)

    def wait(self) -> None:
        while self.pending:
            future, size = self.pending.popleft()
            future.result()
            self.bytes -= size

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


class HashingFile(io.RawIOBase):
    """A write-only file that hashes what passes through it (a written file's sha256 without reading it
    back); with `background`, the hashing runs there on a copy of each write."""

    def __init__(self, f, background: Background | None = None):
        super().__init__()
        self.f, self.sha, self.size, self.background = f, hashlib.sha256(), 0, background

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if self.background is not None:
            self.background.update(self.sha, bytes(b))  # the writer may reuse its buffer once write returns
        else:
            self.sha.update(b)
        self.size += memoryview(b).nbytes
        return self.f.write(b)

    def tell(self) -> int:
        return self.size
