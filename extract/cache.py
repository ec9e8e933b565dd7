"""Writing the HDF5 embedding cache (schema version 1; docs/cache.md describes it).

Crash safety: the work in progress lives in the folder `<cache>.partial/`: a `header.json` with the
settings (model fingerprint included) and one small `.npz` file per committed batch, each written to a
temporary name and renamed into place. A crash, Ctrl-C or a full disk can only lose the batch being
written: a re-run validates every batch file (zip CRC, row counts, continuity), recomputes from the first
damaged one, and resumes. The HDF5 file itself is built at the end, in memory, and written in one go to a
temporary file that is renamed to the final path: nothing half-written ever looks like a cache, and a
failed write of the final file loses no extracted batch. A lock file keeps two processes from writing
the same cache.
"""
from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .errors import DISK_FULL, ExtractError, os_errors
from .files import atomic_path, own_folder
from .identity import (buffer_sha256, cache_file_stem, identity_sha256, short, strings_sha256)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STR = h5py.string_dtype("utf-8")
PARTIAL_FORMAT = "fedclip partial v2"
# Root attributes that must agree before a partial extraction is resumed or a complete cache is kept.
# model_name is not among them: the same weights under another name are the same cache.
# model_dtype (float16 on CUDA, float32 on a CPU) keeps a resumed extraction in one precision.
SETTINGS = ("schema_version", "model_fingerprint", "dataset_name", "domains", "class_names", "prompt_names",
            "prompt_templates", "image_dtype", "inputs_fingerprint", "model_dtype")


def default_cache_path(cache_dir: str, dataset_name: str, model_name_or_path: str) -> Path:
    """<cache_dir>/<dataset>/<model>.h5 where <model> is the hub id with "/" -> "--", or a local model
    folder's base name (never its absolute path)."""
    return Path(cache_dir) / dataset_name / (cache_file_stem(model_name_or_path) + ".h5")


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def inputs_fingerprint(domains) -> str:
    """Hash of every domain's ids and labels: a partial file is resumed only for the same inputs."""
    import hashlib

    h = hashlib.sha256()
    for d in domains:  # not the folder entries that are not inputs: they change no embedding
        h.update(json.dumps([d.name, d.ids, d.labels]).encode())
    return h.hexdigest()


def is_complete(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("complete", False))
    except OSError:
        return False


def read_settings(path: Path) -> dict | None:
    """The root attributes of a fedclip cache (plus `complete`); None when `path` is not one."""
    if not path.is_file():  # a FIFO at the cache path would block h5py forever
        return None
    try:
        with h5py.File(path, "r") as f:
            if "schema_version" not in f.attrs:
                return None
            return {k: _plain(v) for k, v in f.attrs.items()}
    except OSError:
        return None


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    return v.item() if isinstance(v, np.generic) else v


def _show(key: str, value) -> str:
    if value is None:
        return "none"
    if key == "model_fingerprint":
        return short(value)
    if key == "inputs_fingerprint":
        return f"inputs {str(value)[:12]}"
    if isinstance(value, str) and value[:1] == "[":
        try:
            return ",".join(map(str, json.loads(value)))
        except ValueError:
            pass
    return str(value)


def differences(old: dict, new: dict) -> list[str]:
    """What differs between the settings of an existing cache (or partial) and this run, as text."""
    out = []
    for k in SETTINGS:
        a, b = old.get(k), new.get(k)
        if a != b:
            if k == "inputs_fingerprint":
                out.append("the image files (ids or labels) differ")
            else:
                out.append(f"{k} {_show(k, a)} (now {_show(k, b)})")
    return out


LOCK_MARK = b"fedclip extract lock\n"  # the content of a lock file fedclip created (the only kind it removes)


def _take_lock(lock: Path, path: Path) -> int:
    """A descriptor of `lock` holding its exclusive flock. The lock file is removed when a run ends, so a
    lock taken on a file that was meanwhile removed (or replaced) is dropped and taken again."""
    for _ in range(10):
        with os_errors(f"write the lock file {lock}"):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
                os.write(fd, LOCK_MARK)
            except FileExistsError:
                fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise ExtractError(f"another extract process is writing {path} (it holds {lock}); "
                               "wait for it to finish, then re-run") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise ExtractError(f"cannot take the lock file {lock}: other processes keep replacing it; re-run")


@contextmanager
def exclusive_lock(path: Path):
    """Hold `<cache>.lock` while extracting; afterwards remove it if fedclip created it."""
    with os_errors(f"create the cache folder {path.parent}"):
        own_folder(path.parent)  # a linked folder is refused: the cache is written where it is named
    lock = path.with_name(path.name + ".lock")
    fd = _take_lock(lock, path)
    try:
        yield
    finally:
        try:
            if os.pread(fd, len(LOCK_MARK), 0) == LOCK_MARK:  # ours (this run's or a crashed run's), never a foreign file
                lock.unlink()
        except OSError:
            pass  # a lock file left behind is harmless: the next run takes it
        os.close(fd)  # closing the descriptor releases the lock


@dataclass
class DomainProgress:
    processed: int = 0  # source images handled (embedded or skipped)
    batches: list[Path] = field(default_factory=list)


class PartialStore:
    """`<cache>.partial/`: header.json plus d<k>/<start>.npz per committed batch of domain k."""

    def __init__(self, path: Path, settings: dict, num_domains: int):
        self.path, self.dir, self.settings = path, partial_path(path), settings
        self.progress = [DomainProgress() for _ in range(num_domains)]

    # --- opening: resume, refuse, or start over ------------------------------------------------------
    @classmethod
    def open(cls, path: Path, settings: dict, num_domains: int, overwrite: bool) -> "PartialStore":
        store = cls(path, settings, num_domains)
        part = store.dir
        if part.is_symlink():
            raise ExtractError(f"{part} is a symbolic link; fedclip writes an extraction in progress only into a real "
                               f"folder beside the cache: remove the link (rm '{part}') and re-run")
        if part.is_file():  # an HDF5 .partial of an earlier fedclip version
            if not overwrite:
                raise ExtractError(f"{part} is an unfinished extraction by an earlier fedclip version and cannot "
                                   f"be resumed; delete it (rm '{part}') and re-run, or pass overwrite=true")
            log.warning("overwrite=true: discarding %s (an earlier fedclip's unfinished extraction)", part)
            with os_errors(f"delete {part}"):
                part.unlink()
        elif part.is_dir():
            header = store._read_header()
            if header is None:
                raise ExtractError(f"{part} is not a readable fedclip extraction in progress (no valid "
                                   f"header.json); delete it (rm -r '{part}') and re-run")
            diffs = differences(header.get("settings", {}), settings)
            if diffs and not overwrite:
                raise ExtractError(f"{part} is an unfinished extraction with other settings ({'; '.join(diffs)}); "
                                   "re-run with its settings to finish it, pass overwrite=true to discard it, or "
                                   "choose another cache_file")
            if diffs:
                log.warning("overwrite=true: discarding %s (other settings: %s)", part, "; ".join(diffs))
                store.discard()
            else:
                store._scan()
                done = sum(p.processed for p in store.progress)
                if done:
                    log.info("resuming the interrupted extraction in %s (%d images done)", part, done)
        if not (part / "header.json").is_file():
            with os_errors(f"create {part}"):
                own_folder(part)
                _atomic_write(part / "header.json",
                              json.dumps({"format": PARTIAL_FORMAT, "settings": settings}).encode())
        return store

    def _read_header(self) -> dict | None:
        try:
            header = json.loads((self.dir / "header.json").read_text())
        except (OSError, ValueError):
            return None
        return header if isinstance(header, dict) and header.get("format") == PARTIAL_FORMAT else None

    def _scan(self) -> None:
        """Validate the committed batches of every domain; drop the first damaged one and what follows."""
        for k, progress in enumerate(self.progress):
            folder = self.dir / f"d{k:03d}"
            for tmp in folder.glob("*.tmp"):  # a batch that was being written when the run stopped
                tmp.unlink(missing_ok=True)
            files = sorted(folder.glob("*.npz"))
            for i, file in enumerate(files):
                problem = self._check_batch(file, progress.processed)
                if problem:
                    log.warning("%s: %s; recomputing from image %d of domain %d", file, problem,
                                progress.processed, k)
                    for bad in files[i:]:
                        bad.unlink(missing_ok=True)
                    break
                with np.load(file, allow_pickle=False) as z:
                    progress.processed = int(z["end"])
                progress.batches.append(file)

    @staticmethod
    def _check_batch(file: Path, expected_start: int) -> str | None:
        try:
            with np.load(file, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}  # reading every member checks its CRC
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
            return f"damaged batch file ({type(e).__name__}: {e})"
        need = {"start", "end", "embeddings", "labels", "ids", "skipped_ids", "skipped_reasons"}
        if not need <= set(arrays):
            return "incomplete batch file"
        n, s = len(arrays["ids"]), len(arrays["skipped_ids"])
        if (int(arrays["start"]) != expected_start or int(arrays["end"]) - int(arrays["start"]) != n + s
                or len(arrays["embeddings"]) != n or len(arrays["labels"]) != n or len(arrays["skipped_reasons"]) != s):
            return "inconsistent batch file"
        return None

    def discard(self) -> None:
        """Delete this partial folder (only fedclip's own files in it)."""
        with os_errors(f"delete {self.dir}"):
            for sub in sorted(self.dir.glob("d[0-9][0-9][0-9]")):
                for file in list(sub.glob("*.npz")) + list(sub.glob("*.tmp")):
                    file.unlink()
                if not any(sub.iterdir()):
                    sub.rmdir()
            for name in ("header.json", "assembled.h5.tmp"):
                (self.dir / name).unlink(missing_ok=True)
            if not any(self.dir.iterdir()):
                self.dir.rmdir()
            else:
                log.warning("kept %s: it holds files fedclip did not write", self.dir)
        self.progress = [DomainProgress() for _ in self.progress]

    # --- writing ---------------------------------------------------------------------------------------
    def processed(self, k: int) -> int:
        return self.progress[k].processed

    def commit(self, k: int, end: int, embeddings: np.ndarray | None, ids: list[str], labels: list[int],
               skipped: list[tuple[str, str]], dtype: str, embed_dim: int) -> None:
        """Write images [processed, end) of domain k as one batch file (atomically)."""
        progress = self.progress[k]
        folder = self.dir / f"d{k:03d}"
        file = folder / f"{progress.processed:09d}.npz"
        emb = (embeddings if embeddings is not None else np.zeros((0, embed_dim))).astype(dtype)
        buf = io.BytesIO()
        np.savez(buf, start=np.int64(progress.processed), end=np.int64(end), embeddings=emb,
                 labels=np.asarray(labels, np.int64), ids=np.array(ids, dtype=str),
                 skipped_ids=np.array([s[0] for s in skipped], dtype=str),
                 skipped_reasons=np.array([s[1] for s in skipped], dtype=str))
        try:
            own_folder(folder)
            _atomic_write(file, buf.getbuffer())
        except OSError as e:
            raise ExtractError(self._write_failed(e, file)) from None
        progress.processed = end
        progress.batches.append(file)

    def _write_failed(self, e: OSError, file: Path) -> str:
        done = sum(p.processed for p in self.progress)
        keep = (f"the {done} images extracted so far are kept in {self.dir}: re-run the same command to resume"
                if done else "re-run the same command when there is room")
        if e.errno in DISK_FULL:
            return f"disk full while writing {file} ({e.strerror}); free some space on that disk, then {keep}"
        return f"cannot write {file} ({e.strerror or e}); {keep}"

    def read_domain(self, k: int):
        """All committed rows of domain k: (embeddings, labels, ids, skipped ids, skipped reasons)."""
        parts = {key: [] for key in ("embeddings", "labels", "ids", "skipped_ids", "skipped_reasons")}
        for file in self.progress[k].batches:
            with np.load(file, allow_pickle=False) as z:
                for key in parts:
                    parts[key].append(z[key])
        return tuple(np.concatenate(v) if v else None for v in parts.values())

    def assemble(self, header: dict, text: np.ndarray, logit_scale: float, domains, embed_dim: int,
                 dtype: str) -> dict[str, tuple[int, int]]:
        """Build the complete HDF5 file in memory, write it next to the final path, rename it there, and
        remove the partial folder. Returns {domain: (rows, skipped)}."""
        counts = {}
        buf = io.BytesIO()
        with h5py.File(buf, "w") as f:
            attrs = dict(header, complete=True)
            attrs["identity_sha256"] = identity_sha256(attrs)
            f.attrs.update(attrs)
            t = f.create_group("text")
            _put(t, "embeddings", np.ascontiguousarray(text, np.float32))
            _put(t, "logit_scale", np.asarray(logit_scale, np.float32))  # a scalar dataset
            for k, domain in enumerate(domains):
                emb, labels, ids, sids, reasons = self.read_domain(k)
                emb = np.zeros((0, embed_dim), dtype) if emb is None else np.ascontiguousarray(emb, dtype)
                labels = np.zeros(0, np.int64) if labels is None else labels.astype(np.int64)
                ids = [] if ids is None else ids.tolist()
                listed = domain.skipped  # folder entries that are not inputs
                sids = [s for s, _ in listed] + ([] if sids is None else sids.tolist())
                reasons = [r for _, r in listed] + ([] if reasons is None else reasons.tolist())
                g = f.create_group(f"domains/{domain.name}")
                _put(g, "image_embeddings", emb)
                _put(g, "labels", labels)
                _put(g, "ids", ids)
                _put(g, "skipped/ids", sids)
                _put(g, "skipped/reasons", reasons)
                g.attrs.update(num_source_images=len(domain), processed=self.progress[k].processed,
                               rows=len(ids), skipped_rows=len(sids), done=True)
                counts[domain.name] = (len(ids), len(sids))
        try:
            _atomic_write(self.path, buf.getbuffer())  # a link at the cache's path is replaced, never followed
        except OSError as e:
            if e.errno in DISK_FULL:
                raise ExtractError(f"disk full while writing the finished cache {self.path} ({e.strerror}); free "
                                   f"{_size(len(buf.getbuffer()))} on that disk, then re-run the same command: "
                                   f"the extracted embeddings in {self.dir} are kept") from None
            raise ExtractError(f"cannot write the finished cache {self.path} ({e.strerror or e}); the extracted "
                               f"embeddings in {self.dir} are kept: re-run the same command") from None
        self.discard()
        return counts


def _size(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{max(1, round(n / 1e3))} kB"


def _put(g: h5py.Group, name: str, data) -> None:
    if isinstance(data, list):  # strings
        ds = g.create_dataset(name, data=np.array(data, dtype=object), dtype=STR) if data else \
            g.create_dataset(name, (0,), STR)
        ds.attrs["sha256"] = strings_sha256(data)
    else:
        ds = g.create_dataset(name, data=data)
        ds.attrs["sha256"] = buffer_sha256(np.ascontiguousarray(data))


def _atomic_write(path: Path, data) -> None:
    """Write `data` to a temporary file beside `path`, synced and renamed into place (extract/files.py: a link
    at `path` is replaced, never followed; a failure removes the temporary)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
