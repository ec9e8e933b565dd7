"""`python -m extract.hub import <folder> <cache.h5>`: the HDF5 cache back from a folder in the hub layout.

Everything is checked before it is used, in this order, each failure one line naming the file:

1. the card (README.md): it parses, its `fedclip` provenance block is complete and typed, and the subsets
   and features it declares to `load_dataset` are those of its provenance (extract/hub/card.py);
2. the folder holds exactly the files the card lists (plus what the hub adds: .gitattributes), each a
   regular file of the recorded size and sha256 (a tampered, truncated or missing file is refused here);
3. each Parquet file has the columns and types of its subset and the recorded row count;
4. the rebuilt datasets have the sha256 the card records (the cache's own checksums), and the rebuilt root
   attributes the recorded identity.

The file is written to a temporary name beside the target and renamed when complete; an existing file is
replaced only when it is a fedclip cache and `overwrite` is set (as extract does); the same cache already
there is kept.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import files
from ..cache import LOCK_MARK, read_settings
from ..errors import DISK_FULL, ExtractError, os_errors
from ..identity import buffer_sha256, identity_sha256, strings_sha256
from .card import load_manifest
from .export import hub_extra, prompt_text, walk
from .hashing import Background, StringHash
from .layout import CARD, SCALE, SKIPPED, TEXT, Damaged, Manifest, image_features, prompt_features

log = logging.getLogger("extract.hub")
BLOCK_ROWS = 65_536  # rows read from Parquet at a time


@dataclass(frozen=True)
class Imported:
    path: Path
    identity_sha256: str
    rows: int
    reused: bool  # the same cache was there already


def fresh_copy(folder: Path) -> str:
    return f"get a fresh copy of {folder} (python -m extract.hub pull, or copy the whole folder again)"


def read_folder(folder: Path) -> Manifest:
    """The folder's checked manifest, once the folder holds exactly the files its card lists."""
    if not folder.is_dir():
        raise ExtractError(f"{folder} is not a folder; import reads a folder in the hub layout (README.md and its "
                           "data/ files), as python -m extract.hub export writes it")
    try:
        manifest = load_manifest(folder)
    except Damaged as e:
        raise ExtractError(f"{folder / CARD} {e}; {fresh_copy(folder)}") from None
    with os_errors(f"list {folder}"):
        entries = set(walk(folder))
    listed = set(manifest.files) | {CARD}
    extra = sorted(e for e in entries - listed if not hub_extra(e))
    if extra:
        raise ExtractError(f"{folder / extra[0]} is not listed in {folder / CARD}: a folder in the hub layout holds only "
                           f"the files its card lists; remove it, or {fresh_copy(folder)}")
    for path in sorted(listed):
        full = folder / path
        if path not in entries:
            raise ExtractError(f"{full} is missing (its card lists it): the copy is incomplete; {fresh_copy(folder)}")
        try:
            st = os.stat(full)  # a link (huggingface_hub's cache links each file to its blob) is followed here
        except OSError as e:
            raise ExtractError(f"{full} cannot be read ({e.strerror or e}); {fresh_copy(folder)}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ExtractError(f"{full} is not a regular file; {fresh_copy(folder)}")
    return manifest


def check_sizes(folder: Path, manifest: Manifest) -> None:
    """Each data file has the size its card records (a truncated file is refused before anything is read)."""
    for path, record in manifest.files.items():
        size = (folder / path).stat().st_size
        if size != record.size:
            raise ExtractError(f"{folder / path} is {size:,} bytes, its card records {record.size:,}: the file is "
                               f"truncated or was changed; {fresh_copy(folder)}")


class Verifier:
    """The sha256 of every data file, computed on a thread of its own ahead of the reader, which waits for
    a file's verdict (`check`) before it reads the file."""

    def __init__(self, folder: Path, manifest: Manifest, order: list[str]):
        self.folder, self.manifest = folder, manifest
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fedclip-verify")
        self.futures = {name: self.pool.submit(_digest, folder / name) for name in order}

    def check(self, name: str) -> None:
        full = self.folder / name
        try:
            actual = self.futures[name].result()
        except OSError as e:
            raise ExtractError(f"cannot read {full} ({e.strerror or e}); {fresh_copy(self.folder)}") from None
        if actual != self.manifest.files[name].sha256:
            raise ExtractError(f"{full} does not match the sha256 its card records: the file was changed or damaged; "
                               f"{fresh_copy(self.folder)}")

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def existing(cache: Path, manifest: Manifest, overwrite: bool) -> bool:
    """True when `cache` already is this cache (nothing to do). A file there that is not a fedclip cache is
    never replaced; another fedclip cache only with `overwrite`."""
    if not cache.exists() and not cache.is_symlink():
        return False
    settings = read_settings(cache) if not cache.is_symlink() else None
    if settings is None:
        raise ExtractError(f"{cache} exists and is not a fedclip cache; fedclip does not overwrite it: move it away "
                           "or choose another path")
    same = settings.get("identity_sha256") == manifest.identity_sha256 and _checksums(cache) == {
        p: r.sha256 for p, r in manifest.datasets.items()}
    if same:
        return True
    if overwrite:
        log.info("overwrite=true: replacing %s", cache)
        return False
    theirs = str(settings.get("identity_sha256"))
    what = "other contents" if theirs == manifest.identity_sha256 else "another identity"
    raise ExtractError(f"{cache} is a fedclip cache with {what} (identity {theirs[:12]}, this folder's "
                       f"{manifest.identity_sha256[:12]}); pass overwrite=true to replace it, or give another path to "
                       "keep both")


def _checksums(cache: Path) -> dict:
    import h5py

    out = {}
    try:
        with h5py.File(cache, "r") as f:
            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    value = obj.attrs.get("sha256")
                    out["/" + name] = value.decode() if isinstance(value, bytes) else value
            f.visititems(visit)
    except OSError:
        return {}
    return out


@contextmanager
def waiting_lock(path: Path):
    """Hold extract's lock file `<cache>.lock` (extract/cache.py), waiting for another holder: two pulls of
    one revision (the jobs of a parallel sweep) build it once."""
    files.own_folder(path.parent)
    lock = path.with_name(path.name + ".lock")
    while True:
        with os_errors(f"write the lock file {lock}"):
            fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)  # a link there is not followed
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process writing %s (it holds %s)", path, lock)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino  # not removed by its last holder meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        if os.fstat(fd).st_size == 0:
            os.write(fd, LOCK_MARK)
        yield
    finally:
        try:
            if os.pread(fd, len(LOCK_MARK), 0) == LOCK_MARK:
                lock.unlink()
        except OSError:
            pass
        os.close(fd)


def import_folder(folder: str | Path, cache: str | Path, *, overwrite: bool = False) -> Imported:
    """Rebuild the cache of `folder` (the hub layout) at `cache`, verified; see the module docstring."""
    folder, cache = Path(folder), Path(cache)
    manifest = read_folder(folder)
    rows = sum(manifest.rows(d) for d in manifest.domains)
    if existing(cache, manifest, overwrite):
        log.info("%s already holds this cache (identity %s): nothing to do", cache, manifest.identity_sha256[:12])
        return Imported(cache, manifest.identity_sha256, rows, True)
    check_sizes(folder, manifest)
    order = [name for d in manifest.domains for name in manifest.image_files[d]] + list(manifest.prompt_files)
    try:
        with waiting_lock(cache):
            if existing(cache, manifest, overwrite):  # another process built it while this one waited
                return Imported(cache, manifest.identity_sha256, rows, True)
            _check_space(cache, manifest)
            with files.atomic_path(cache) as tmp, Verifier(folder, manifest, order) as verifier, \
                    Background() as background:
                _build(tmp, folder, manifest, verifier, background)
    except files.UnsafePath as e:
        raise ExtractError(str(e)) from None
    except (ValueError, TypeError, KeyError) as e:  # h5py refusing a name or value the checks let through
        raise ExtractError(f"{folder / CARD} describes a cache that cannot be written ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:120]}); {fresh_copy(folder)}") from None
    except OSError as e:
        if e.errno in DISK_FULL:
            raise ExtractError(f"disk full while writing {cache} ({e.strerror}); free some space on that disk, then "
                               "re-run the same command") from None
        raise ExtractError(f"cannot write {cache}: {e.strerror or e}") from None
    log.info("imported %s into %s: %d image rows, identity %s", folder, cache, rows, manifest.identity_sha256[:12])
    return Imported(cache, manifest.identity_sha256, rows, False)


def _check_space(cache: Path, manifest: Manifest) -> None:
    need = sum(r.size for r in manifest.files.values()) + 2**20
    free = shutil.disk_usage(cache.parent).free
    if free < need:
        raise ExtractError(f"not enough space for {cache}: it needs about {need / 1e6:,.0f} MB, {free / 1e6:,.0f} MB "
                           "are free on that disk; free some space or choose another path")


def _build(tmp: Path, folder: Path, m: Manifest, verifier: Verifier, background: Background) -> None:
    import h5py

    with h5py.File(tmp, "w") as f:
        for path in sorted(m.groups, key=lambda p: p.count("/") if p != "/" else 0):
            g = f if path == "/" else f.require_group(path)
            for k, v in m.groups[path].items():
                g.attrs[k] = v
        for d in m.domains:
            _domain(f, folder, m, d, verifier, background)
            for k in SKIPPED:
                p = f"/domains/{d}/{k}"
                if p in m.datasets:
                    values = list(m.datasets[p].values)
                    _check(folder, m, p, strings_sha256(values))
                    ds = _create(f, m, p)
                    if values:
                        ds[...] = np.array(values, dtype=object)
        _prompts(f, folder, m, verifier)
        rec = m.datasets[SCALE]
        value = np.asarray(np.dtype(rec.dtype).type(rec.values[0]))
        _check(folder, m, SCALE, buffer_sha256(np.ascontiguousarray(value)))
        f.create_dataset(SCALE, data=value)
        f[SCALE].attrs.update(rec.attrs)
        if identity_sha256(f.attrs) != m.identity_sha256 or str(f.attrs.get("identity_sha256")) != m.identity_sha256:
            raise ExtractError(f"{folder / CARD} records root attributes whose identity is not the identity it records "
                               f"({m.identity_sha256[:12]}): the card was changed; {fresh_copy(folder)}")


def _create(f, m: Manifest, path: str):
    import h5py

    rec = m.datasets[path]
    dtype = h5py.string_dtype("utf-8") if rec.dtype == "str" else np.dtype(rec.dtype)
    ds = f.create_dataset(path, shape=rec.shape, dtype=dtype)
    ds.attrs.update(rec.attrs)
    return ds


def _check(folder: Path, m: Manifest, path: str, actual: str) -> None:
    if actual != m.datasets[path].sha256:
        raise ExtractError(f"the files of {folder} do not rebuild {path} with the sha256 {folder / CARD} records for it: "
                           f"the card or the files were changed; {fresh_copy(folder)}")


def _parquet(folder: Path, name: str, m: Manifest, features, verifier: Verifier):
    """The Parquet file `name`, once its sha256, columns and row count are what the card records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    verifier.check(name)
    full = folder / name
    try:
        pf = pq.ParquetFile(full)
    except (pa.ArrowException, OSError) as e:
        raise ExtractError(f"{full} is not readable Parquet ({' '.join(str(e).split())[:120]}); {fresh_copy(folder)}") from None
    want = features.arrow_schema.remove_metadata()
    got = pf.schema_arrow.remove_metadata()
    if not got.equals(want):
        raise ExtractError(f"{full} has columns {_columns(got)}, not the {_columns(want)} its card declares; "
                           f"{fresh_copy(folder)}")
    if pf.metadata.num_rows != m.files[name].rows:
        raise ExtractError(f"{full} holds {pf.metadata.num_rows} rows, its card records {m.files[name].rows}; "
                           f"{fresh_copy(folder)}")
    return pf


def _columns(schema) -> str:
    return "(" + ", ".join(f"{f.name}: {f.type}" for f in schema) + ")"


def _batches(pf, full: Path, folder: Path):
    import pyarrow as pa

    try:
        for batch in pf.iter_batches(batch_size=BLOCK_ROWS):
            for name, column in zip(batch.schema.names, batch.columns):
                inner = column.flatten() if pa.types.is_fixed_size_list(column.type) else None
                if column.null_count or (inner is not None and inner.null_count):
                    raise ExtractError(f"{full} has missing values in column {name}; {fresh_copy(folder)}")
            yield batch
    except (pa.ArrowException, OSError) as e:
        raise ExtractError(f"{full} cannot be read ({' '.join(str(e).split())[:120]}); {fresh_copy(folder)}") from None


def _domain(f, folder: Path, m: Manifest, d: str, verifier: Verifier, background: Background) -> None:
    import pyarrow.compute as pc

    emb_path, lab_path, ids_path = (f"/domains/{d}/{k}" for k in ("image_embeddings", "labels", "ids"))
    dtype = m.datasets[emb_path].dtype
    features = image_features(m.class_names, m.embed_dim, dtype)
    emb, labels, ids = (_create(f, m, p) for p in (emb_path, lab_path, ids_path))
    label_dtype = np.dtype(m.datasets[lab_path].dtype)
    hashes = {emb_path: hashlib.sha256(), lab_path: hashlib.sha256(), ids_path: StringHash()}
    row = 0
    for name in m.image_files[d]:
        full = folder / name
        for batch in _batches(_parquet(folder, name, m, features, verifier), full, folder):
            n = batch.num_rows
            if not pc.all(pc.equal(batch.column("domain"), d)).as_py():
                raise ExtractError(f"{full} holds rows of another domain than {d}; {fresh_copy(folder)}")
            x = np.ascontiguousarray(
                batch.column("embedding").flatten().to_numpy(zero_copy_only=False).reshape(n, m.embed_dim))
            y = batch.column("label").to_numpy().astype(label_dtype)
            names = batch.column("id").to_pylist()
            background.update(hashes[emb_path], x)
            background.update(hashes[lab_path], y)
            background.strings(hashes[ids_path], names)
            emb[row:row + n] = x
            labels[row:row + n] = y
            ids[row:row + n] = np.array(names, dtype=object)
            row += n
    background.wait()
    for path, sha in hashes.items():
        _check(folder, m, path, sha.hexdigest())


def _prompts(f, folder: Path, m: Manifest, verifier: Verifier) -> None:
    rec = m.datasets[TEXT]
    T, C, D = rec.shape
    root = m.groups["/"]
    templates = _json(root.get("prompt_templates"))
    prompt_names = _json(root.get("prompt_names")) or list(m.class_names)
    features = prompt_features(m.class_names, D, rec.dtype)
    text = np.empty((T * C, D), dtype=np.dtype(rec.dtype))
    row = 0
    for name in m.prompt_files:
        full = folder / name
        for batch in _batches(_parquet(folder, name, m, features, verifier), full, folder):
            n = batch.num_rows
            t, c = np.divmod(np.arange(row, row + n), C)
            labels = batch.column("label").to_numpy()
            shown = batch.column("template").to_pylist()
            if not np.array_equal(labels, c) or (templates is not None and len(templates) == T and
                                                  shown != [templates[i] for i in t]):
                raise ExtractError(f"{full} does not hold the prompts in their order (template-major, one row per "
                                   f"class); {fresh_copy(folder)}")
            if len(prompt_names) == C and (batch.column("prompt_name").to_pylist() != [prompt_names[j] for j in c] or
                                           batch.column("prompt").to_pylist() != [
                                               prompt_text(shown[i], prompt_names[j]) for i, j in enumerate(c)]):
                raise ExtractError(f"{full} holds prompt texts that are not its templates filled with the class "
                                   f"names; {fresh_copy(folder)}")
            text[row:row + n] = batch.column("embedding").flatten().to_numpy(zero_copy_only=False).reshape(n, D)
            row += n
    text = text.reshape(T, C, D)
    _check(folder, m, TEXT, buffer_sha256(text))
    f.create_dataset(TEXT, data=text)
    f[TEXT].attrs.update(rec.attrs)


def _json(value):
    try:
        out = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return out if isinstance(out, list) else None
