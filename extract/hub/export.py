"""`python -m extract.hub export <cache.h5> <folder>`: a cache in the hub layout (extract/hub/layout.py).

The cache is checked as `federate` checks it (a self-contained HDF5 file, typed attributes, the identity
checksum, declared dtypes and shapes) and then streamed, one Parquet file of at most `SHARD_VALUES`
embedding values at a time, so memory stays bounded whatever the cache's size. Every dataset's sha256 is
computed on the blocks as they are read and compared with the cache's own checksum: a damaged cache is
never published. Each Parquet file's sha256 is computed as it is written.

The folder must be new, empty, or one this command wrote (its card lists the files it wrote). The card
is written first, as a plan (`complete: false`) naming every file the export may write, so a folder left
by an interrupted export is still recognised and can be exported into again; the final card replaces it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import files
from ..cache_checks import SCHEMA_VERSION, CacheFormatError, check_declared, open_cache, read_header
from ..errors import ExtractError, os_errors
from ..identity import buffer_sha256, identity_sha256, strings_sha256
from . import card as cards
from .hashing import Background, HashingFile, StringHash
from .layout import (CARD, FORMAT, HUB_FILES, HUB_FOLDERS, SCALE, SKIPPED, TEXT, FileRecord,
                     dtype_name, encode_attr, image_features, image_files, prompt_features, prompt_files,
                     shard_rows)

log = logging.getLogger("extract.hub")


@dataclass(frozen=True)
class Exported:
    folder: Path
    identity_sha256: str
    files: dict  # path -> FileRecord
    rows: int


def write_parquet(path: Path, table, features, background: Background | None = None) -> FileRecord:
    """Write `table` (a pyarrow table of `features`' schema) as Parquet through `datasets`, atomically; its
    sha256 is computed as it is written (on `background`, which this waits for)."""
    from datasets import Dataset, DatasetInfo
    from datasets.table import InMemoryTable

    # The fingerprint is only a name here: computing one would pickle the whole table.
    dataset = Dataset(InMemoryTable(table), info=DatasetInfo(features=features), fingerprint=f"fedclip-{path.name}")
    with files.open_atomic(path, "wb") as f, quiet_datasets():
        out = HashingFile(f, background)
        # Content-defined chunking (datasets' default, for deduplication on the hub) costs 10x the write
        # time on float16 columns, and an embedding cache is re-exported whole or not at all; min/max
        # statistics of the embedding values (half the time of a float16 file) say nothing.
        dataset.to_parquet(out, use_content_defined_chunking=False,
                           write_statistics=[name for name in features if name != "embedding"])
    if background is not None:
        background.wait()
    return FileRecord(out.sha.hexdigest(), out.size, len(table))


@contextmanager
def quiet_datasets():
    """No `datasets` progress bar per file (the log names each file), restored afterwards."""
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            enable_progress_bars()


# --- the source cache --------------------------------------------------------------------------------------

@dataclass
class Source:
    path: Path
    f: object  # the open h5py.File
    header: object
    groups: dict  # group path -> [typed attribute, ...]
    datasets: dict  # dataset path -> h5py.Dataset

    def sha256(self, path: str) -> str:
        value = self.datasets[path].attrs.get("sha256")
        return value.decode() if isinstance(value, bytes) else str(value)


def open_source(path: Path) -> Source:
    """The cache, checked before anything big is read: what federate checks on load, plus that every
    object is one the hub layout maps."""
    try:
        f = open_cache(path)
    except CacheFormatError as e:
        raise ExtractError(f"{path} {e}; only a fedclip cache can be exported") from None
    try:
        return _inspect(path, f)
    except CacheFormatError as e:
        f.close()
        raise ExtractError(f"{path} {e}; only a usable fedclip cache can be exported") from None
    except ExtractError:
        f.close()
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        f.close()
        raise ExtractError(f"{path} does not follow the cache schema ({type(e).__name__}: {e}); only a usable "
                           "fedclip cache can be exported") from None


def _inspect(path: Path, f) -> Source:
    import h5py

    a = f.attrs
    header = read_header(a)
    where = str(path)
    if header.schema_version != SCHEMA_VERSION or not header.complete:
        what = "not complete" if not header.complete else f"of schema version {header.schema_version}"
        raise ExtractError(f"{path} is {what}; only a complete cache of this fedclip's schema can be exported")
    if "identity_sha256" not in a or identity_sha256(a) != str(a["identity_sha256"]):
        raise ExtractError(f"{path} has {'no' if 'identity_sha256' not in a else 'a mismatching'} identity checksum "
                           "(identity_sha256); a cache that cannot be verified is not exported: rebuild it with the "
                           "python -m extract command that built it, plus overwrite=true")
    groups, datasets = {"/": [encode_attr(k, v, where) for k, v in a.items()]}, {}

    def visit(name, obj):
        if isinstance(obj, h5py.Group):
            groups["/" + name] = [encode_attr(k, v, f"{where}:/{name}") for k, v in obj.attrs.items()]
        else:
            datasets["/" + name] = obj

    f.visititems(visit)
    classes, dim = len(header.class_names), header.embed_dim
    kinds = {TEXT: ("float", (None, classes, dim)), SCALE: ("float", ())}  # dataset -> check_declared's rule
    for d in header.domains:
        base = f"/domains/{d}"
        for p in (TEXT, SCALE, f"{base}/ids", f"{base}/labels", f"{base}/image_embeddings"):
            if p not in datasets:
                raise ExtractError(f"{path} lacks {p}; only a complete cache can be exported")
        n = datasets[f"{base}/ids"].shape[0] if datasets[f"{base}/ids"].ndim == 1 else None
        sids = datasets.get(f"{base}/skipped/ids")
        if (sids is None) != (f"{base}/skipped/reasons" not in datasets):
            raise ExtractError(f"{path} has only one of {base}/skipped/ids and {base}/skipped/reasons")
        s = sids.shape[0] if sids is not None and sids.ndim == 1 else None
        kinds.update({f"{base}/ids": ("str", (None,)), f"{base}/labels": ("int", (n,)),
                      f"{base}/image_embeddings": ("float", (n, dim)), f"{base}/skipped/ids": ("str", (None,)),
                      f"{base}/skipped/reasons": ("str", (s,))})
    unknown = sorted(set(datasets) - set(kinds))
    if unknown:
        raise ExtractError(f"{path} holds {unknown[0]}, which is not part of the cache schema; the hub layout does "
                           "not map it")
    for p, ds in datasets.items():
        check_declared(ds, *kinds[p])
        name = dtype_name(ds.dtype)
        if " " in name:
            raise ExtractError(f"{path} holds {p} of dtype {name}, which fedclip does not write (UTF-8 strings, "
                               "little-endian numbers); the hub layout does not map it")
        if "sha256" not in ds.attrs:
            raise ExtractError(f"{path} has no checksum for {p} (an older fedclip wrote it) and cannot be verified; "
                               "rebuild it with the python -m extract command that built it, plus overwrite=true")
    dtypes = {datasets[f"/domains/{d}/image_embeddings"].dtype.name for d in header.domains}
    if len(dtypes) > 1:
        raise ExtractError(f"{path} stores its domains' embeddings in different dtypes "
                           f"({', '.join(sorted(dtypes))}); the images subset has one")
    return Source(path, f, header, groups, datasets)


# --- the target folder ---------------------------------------------------------------------------------------

def walk(folder: Path) -> list[str]:
    """Every entry under `folder` that is not a folder (files, links, FIFOs, ...), as a relative POSIX path;
    links to folders are entries too (never followed)."""
    out = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        rel = Path(root).relative_to(folder)
        for d in list(dirs):
            if (Path(root) / d).is_symlink():
                out.append((rel / d).as_posix())
                dirs.remove(d)
        out += [(rel / n).as_posix() for n in names]
    return sorted(out)


def hub_extra(path: str) -> bool:
    """A file the hub or huggingface_hub adds, which a folder in the hub layout may hold."""
    return path in HUB_FILES or path.startswith(HUB_FOLDERS)


def owned_files(folder: Path) -> set[str]:
    """The files a previous export wrote in `folder` (which this one may replace). A folder holding
    anything else (or a card that is not an export's) is refused: the tool never overwrites what it did
    not write."""
    if folder.is_symlink():
        raise ExtractError(f"{folder} is a symbolic link; the tool writes only into real folders: remove the link "
                           "or give another folder")
    if not folder.exists():
        return set()
    if not folder.is_dir():
        raise ExtractError(f"{folder} exists and is not a folder; give a new or empty folder")
    with os_errors(f"list {folder}"):
        entries = [e for e in walk(folder) if not hub_extra(e)]
    if not entries:
        return set()
    card = folder / CARD
    block = cards.read_block(card) if card.is_file() and not card.is_symlink() else None
    refuse = (f"{folder} is not empty and was not written by python -m extract.hub export; it writes only into a "
              f"new or empty folder, or one it wrote: give another folder")
    if not isinstance(block, dict) or block.get("format") != FORMAT:
        raise ExtractError(refuse + f" (it holds {entries[0]})")
    listed = block.get("files") if isinstance(block.get("files"), dict) else {}
    writing = block.get("writing") if isinstance(block.get("writing"), list) else []
    ours = {CARD, *map(str, listed), *map(str, writing)}
    foreign = [e for e in entries if e not in ours or (folder / e).is_symlink() or not (folder / e).is_file()]
    if foreign:
        raise ExtractError(f"{folder / foreign[0]} is in the export folder but python -m extract.hub export did not "
                           "write it; it writes only into a new or empty folder, or one it wrote: move that file away or "
                           "give another folder")
    return set(entries)


def _remove(folder: Path, stale: set[str]) -> None:
    """Delete files of an earlier export that this one did not write again, and the folders they leave
    empty."""
    for rel in sorted(stale):
        with os_errors(f"remove {folder / rel}"):
            (folder / rel).unlink(missing_ok=True)
        parent = (folder / rel).parent
        while parent != folder and parent.is_dir() and not parent.is_symlink() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


# --- export ------------------------------------------------------------------------------------------------

def export(cache: str | Path, folder: str | Path, *, repo_id: str | None = None,
           license: str | None = None) -> Exported:
    """Write the cache at `cache` into `folder` in the hub layout; return what was written. `repo_id` (when
    known) goes into the card's examples; `license` overrides the one the dataset's config gives."""
    cache, folder = Path(cache), Path(folder)
    src = open_source(cache)
    try:
        with src.f:
            return _export(src, folder, repo_id, license)
    except files.UnsafePath as e:
        raise ExtractError(str(e)) from None
    except OSError as e:
        raise ExtractError(f"cannot write the export into {folder}: {e.strerror or e}") from None


def _export(src: Source, folder: Path, repo_id: str | None, license: str | None) -> Exported:
    import pyarrow as pa

    header, dim = src.header, src.header.embed_dim
    old = owned_files(folder)
    image_dtype = src.datasets[f"/domains/{header.domains[0]}/image_embeddings"].dtype
    per_image = shard_rows(dim)
    text = src.datasets[TEXT]
    per_prompt = shard_rows(dim)
    plan = {d: image_files(d, src.datasets[f"/domains/{d}/ids"].shape[0], per_image) for d in header.domains}
    prompts = prompt_files(text.shape[0] * text.shape[1], per_prompt)
    new = [p for d in header.domains for p in plan[d]] + prompts
    files.own_folder(folder)
    files.write_text(folder / CARD, cards.plan_card(sorted(old | set(new) | {CARD})))

    records, datasets = {}, {}
    features = image_features(header.class_names, dim, image_dtype.name)
    rows = 0
    with Background() as background:
        for d in header.domains:
            emb, labels, ids = (src.datasets[f"/domains/{d}/{k}"] for k in ("image_embeddings", "labels", "ids"))
            hashes = {"image_embeddings": hashlib.sha256(), "labels": hashlib.sha256(), "ids": StringHash()}
            for k, name in enumerate(plan[d]):
                a, b = k * per_image, min(ids.shape[0], (k + 1) * per_image)
                x, y = np.ascontiguousarray(emb[a:b]), np.ascontiguousarray(labels[a:b])
                names = _strings(ids, a, b, src.path)
                background.update(hashes["image_embeddings"], x)
                background.update(hashes["labels"], y)
                background.strings(hashes["ids"], names)
                columns = [pa.array(names, pa.string()), pa.array(y.astype(np.int64, copy=False)),
                           pa.array(np.full(b - a, d, dtype=object), pa.string()), _vectors(x)]
                table = pa.Table.from_arrays(columns, schema=features.arrow_schema)
                records[name] = write_parquet(folder / name, table, features, background)
                log.info("wrote %s (%d rows)", folder / name, b - a)
            rows += ids.shape[0]
            background.wait()
            for k, sha in hashes.items():
                _same(src, f"/domains/{d}/{k}", sha.hexdigest())
            for k in ("image_embeddings", "labels", "ids"):
                datasets[f"/domains/{d}/{k}"] = _record(src, f"/domains/{d}/{k}")
            if f"/domains/{d}/skipped/ids" in src.datasets:
                for k in SKIPPED:
                    p = f"/domains/{d}/{k}"
                    values = _strings(src.datasets[p], 0, src.datasets[p].shape[0], src.path)
                    _same(src, p, strings_sha256(values))
                    datasets[p] = _record(src, p, values=values)

    values = np.asarray(text[()])
    _same(src, TEXT, buffer_sha256(np.ascontiguousarray(values)))
    datasets[TEXT] = _record(src, TEXT)
    scale = np.asarray(src.datasets[SCALE][()])
    _same(src, SCALE, buffer_sha256(np.ascontiguousarray(scale)))
    datasets[SCALE] = _record(src, SCALE, values=[scale.item()])
    records.update(_write_prompts(src, folder, prompts, values, per_prompt))

    _remove(folder, old - set(new) - {CARD})
    block = {"format": FORMAT, "complete": True,
             "cache": {"identity_sha256": str(src.f.attrs["identity_sha256"]), "groups": src.groups,
                       "datasets": datasets},
             "images": {d: plan[d] for d in header.domains}, "prompts": prompts,
             "files": {p: {"sha256": r.sha256, "bytes": r.size, "rows": r.rows} for p, r in records.items()},
             "exported_with": cards.versions()}
    files.write_text(folder / CARD, cards.final_card(block, header, src, image_dtype.name, text.dtype.name,
                                                     repo_id=repo_id, license=license))
    log.info("exported %s to %s: %d image rows in %d files, identity %s", src.path, folder, rows, len(records),
             block["cache"]["identity_sha256"][:12])
    return Exported(folder, block["cache"]["identity_sha256"], records, rows)


def _write_prompts(src: Source, folder: Path, names: list[str], text: np.ndarray, per_shard: int) -> dict:
    """The prompts subset: one row per (template, class), template-major as /text/embeddings stores them."""
    import pyarrow as pa

    header = src.header
    T, C, D = text.shape
    templates = _json_list(src.f.attrs, "prompt_templates", T, src.path)
    prompt_names = _json_list(src.f.attrs, "prompt_names", C, src.path) or list(header.class_names)
    templates = templates or [""] * T
    flat = text.reshape(T * C, D)
    features = prompt_features(header.class_names, D, text.dtype.name)
    out = {}
    for k, name in enumerate(names):
        a, b = k * per_shard, min(T * C, (k + 1) * per_shard)
        t, c = np.divmod(np.arange(a, b), C)
        table = pa.Table.from_arrays(
            [pa.array([templates[i] for i in t], pa.string()), pa.array(c.astype(np.int64)),
             pa.array([prompt_names[i] for i in c], pa.string()),
             pa.array([prompt_text(templates[i], prompt_names[j]) for i, j in zip(t, c)], pa.string()),
             _vectors(flat[a:b])], schema=features.arrow_schema)
        out[name] = write_parquet(folder / name, table, features)
    return out


def prompt_text(template: str, name: str) -> str:
    """The prompt as extract wrote it (`template.format(name)`)."""
    try:
        return template.format(name)
    except (IndexError, KeyError, ValueError):
        return template.replace("{}", name)


def _json_list(attrs, key: str, length: int, path: Path) -> list[str] | None:
    """A JSON list attribute of `length` strings; None when the cache does not have it."""
    if key not in attrs:
        return None
    try:
        value = json.loads(attrs[key])
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, list) or len(value) != length or not all(isinstance(v, str) for v in value):
        raise ExtractError(f"{path} has attribute {key} that is not a JSON list of {length} strings (one per row of "
                           f"{TEXT}); the prompts subset cannot name its rows")
    return value


def _vectors(x: np.ndarray):
    """Rows of `x` as a fixed-size list array, without copying the values."""
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).reshape(-1)), x.shape[1])


def _strings(ds, a: int, b: int, path: Path) -> list[str]:
    try:
        return list(ds.asstr()[a:b])
    except UnicodeDecodeError as e:
        raise ExtractError(f"{path} holds {ds.name} with bytes that are not UTF-8 ({e.reason}); only a usable fedclip "
                           "cache can be exported") from None


def _same(src: Source, path: str, actual: str) -> None:
    if actual != src.sha256(path):
        raise ExtractError(f"checksum mismatch in {path} of {src.path}: the file was changed or damaged after it was "
                           "written, and a damaged cache is not exported; get a fresh copy or rebuild it with the "
                           "python -m extract command that built it, plus overwrite=true")


def _record(src: Source, path: str, values=None) -> dict:
    ds = src.datasets[path]
    entry = {"dtype": dtype_name(ds.dtype), "shape": list(ds.shape),
             "attributes": [encode_attr(k, v, f"{src.path}:{path}") for k, v in ds.attrs.items()]}
    if values is not None:
        entry["values"] = list(values)
    return entry
