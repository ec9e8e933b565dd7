"""Writing the HDF5 embedding cache (schema version 1, see the README).

Crash safety: everything is written to `<cache>.partial`; each batch is appended and flushed before the
domain's progress counters move, so a re-run truncates any uncommitted tail and resumes at the last
committed batch. Only a finished file gets `complete = True` and is renamed to its final path. A lock
file keeps two processes from writing the same cache.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from .errors import ExtractError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STR = h5py.string_dtype("utf-8")
# Root attributes that must agree before a partial file may be resumed.
IDENTITY = ("schema_version", "model_name", "dataset_name", "embed_dim", "domains", "class_names",
            "prompt_templates", "prompt_names", "image_dtype", "inputs_fingerprint")


def default_cache_path(cache_dir: str, dataset_name: str, model_name: str) -> Path:
    return Path(cache_dir) / dataset_name / (model_name.strip("/").replace("/", "--") + ".h5")


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def inputs_fingerprint(domains) -> str:
    """Hash of every domain's ids and labels: a partial file is resumed only for the same inputs."""
    h = hashlib.sha256()
    for d in domains:
        h.update(json.dumps([d.name, d.ids, d.labels]).encode())
    return h.hexdigest()


def dataset_sha256(ds: h5py.Dataset) -> str:
    data = ds[()]
    if data.dtype.kind == "O":  # variable-length strings
        return hashlib.sha256("\n".join(s.decode() if isinstance(s, bytes) else s for s in data).encode()).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def is_complete(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("complete", False))
    except OSError:
        return False


@contextmanager
def exclusive_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise ExtractError(f"another extract process is writing {path} (it holds {lock}); "
                               "wait for it to finish, then re-run") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _attrs_match(f: h5py.File, header: dict) -> bool:
    return all(k in f.attrs and f.attrs[k] == header[k] for k in IDENTITY)


@contextmanager
def open_partial(path: Path, header: dict):
    """Open (resuming when possible) or create `<path>.partial` with the root attributes in `header`."""
    part = partial_path(path)
    f = None
    if part.exists():
        try:
            f = h5py.File(part, "a")
            if _attrs_match(f, header):
                log.info("resuming the interrupted extraction in %s", part)
            else:
                log.warning("%s was started with other settings or inputs; starting over", part)
                f.close()
                f = None
        except OSError:
            log.warning("%s is unreadable (killed mid-write?); starting over", part)
            f = None
    if f is None:
        f = h5py.File(part, "w")
    try:
        for k, v in header.items():
            f.attrs[k] = v
        f.attrs["complete"] = False
        yield f
    finally:
        f.close()


def write_text(f: h5py.File, embeddings: np.ndarray, logit_scale: float) -> None:
    if "text" in f:
        del f["text"]
    g = f.create_group("text")
    ds = g.create_dataset("embeddings", data=embeddings.astype(np.float32))
    ds.attrs["sha256"] = dataset_sha256(ds)
    g.create_dataset("logit_scale", data=np.float32(logit_scale))
    f.flush()


class DomainWriter:
    """Appends committed batches to /domains/<name>; resumes from the last committed batch."""

    def __init__(self, f: h5py.File, name: str, num_images: int, embed_dim: int, dtype: str):
        root = f.require_group("domains")
        if name not in root:
            g = root.create_group(name)
            g.create_dataset("image_embeddings", (0, embed_dim), dtype, maxshape=(None, embed_dim),
                             chunks=(256, embed_dim))
            g.create_dataset("labels", (0,), np.int64, maxshape=(None,), chunks=(4096,))
            g.create_dataset("ids", (0,), STR, maxshape=(None,), chunks=(1024,))
            s = g.create_group("skipped")
            s.create_dataset("ids", (0,), STR, maxshape=(None,), chunks=(64,))
            s.create_dataset("reasons", (0,), STR, maxshape=(None,), chunks=(64,))
            g.attrs.update(num_source_images=num_images, processed=0, rows=0, skipped_rows=0, done=False)
        self.g = root[name]
        # Drop whatever was written after the last commit.
        for key, n in (("image_embeddings", "rows"), ("labels", "rows"), ("ids", "rows"),
                       ("skipped/ids", "skipped_rows"), ("skipped/reasons", "skipped_rows")):
            self.g[key].resize(int(self.g.attrs[n]), axis=0)

    @property
    def processed(self) -> int:
        return int(self.g.attrs["processed"])

    @property
    def done(self) -> bool:
        return bool(self.g.attrs["done"])

    @staticmethod
    def _append(ds: h5py.Dataset, values) -> None:
        n = ds.shape[0]
        ds.resize(n + len(values), axis=0)
        ds[n:] = values

    def commit(self, embeddings: np.ndarray, ids: list[str], labels: list[int], skipped: list[tuple[str, str]],
               processed: int) -> None:
        g = self.g
        if len(ids):
            self._append(g["image_embeddings"], embeddings.astype(g["image_embeddings"].dtype))
            self._append(g["labels"], np.asarray(labels, np.int64))
            self._append(g["ids"], ids)
        if skipped:
            self._append(g["skipped/ids"], [s[0] for s in skipped])
            self._append(g["skipped/reasons"], [s[1] for s in skipped])
        g.file.flush()
        g.attrs.update(processed=processed, rows=g["ids"].shape[0], skipped_rows=g["skipped/ids"].shape[0])
        g.file.flush()

    def finish(self) -> None:
        for key in ("image_embeddings", "labels", "ids"):
            self.g[key].attrs["sha256"] = dataset_sha256(self.g[key])
        self.g.attrs["done"] = True
        self.g.file.flush()


def publish(path: Path) -> None:
    """Move the finished `<path>.partial` (already marked complete and closed) to its final path."""
    os.replace(partial_path(path), path)
