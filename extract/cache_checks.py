"""What a cache file must be before anything in it is trusted (shared by federate.cache and extract.info).

A cache is read by colleagues who did not write it, so the file is checked as hostile input, in this order:

1. `open_cache`: the path is a regular file (a FIFO would block the reader forever), readable as HDF5,
   and holds only its own data: every link is a hard link (no external or soft link) and no dataset is
   virtual or stored in external raw files. The walk reads links without resolving them, so an external
   link to another file, or to a FIFO, is never opened.
2. `check_declared`: a dataset's dtype, shape and stored size are checked before it is read: a small file
   cannot declare 2^40 labels and make the reader allocate them.
3. `read_header`: the root attributes have their types (`schema_version` is the integer 1, `class_names`
   and `domains` are JSON lists of strings) and names are single path components (`dataset_name`, domain
   and class names end up in file names).
4. `check_text` / `check_domain`: the values read are usable (finite, non-zero vectors, a finite positive
   logit scale, labels in range, unique ids, at least one image per loaded domain).

Each check raises `CacheFormatError` with one line that says what is wrong, worded to follow the file's
path (`<path> has ...`); `check_domain`'s message names the file itself.
Only h5py and numpy are needed: federate imports this without transformers or torch.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass

import h5py
import numpy as np

SCHEMA_VERSION = 1
# The most a filter (gzip, the strongest in common use, tops out near 1032:1) can expand stored bytes.
MAX_FILTER_RATIO = 1100
VLEN_REFERENCE_BYTES = 16  # a variable-length string's reference in the file (length + global heap id)


class CacheFormatError(ValueError):
    """The file is not a usable fedclip cache; the message says why in one line."""


class EmptyDomainError(CacheFormatError):
    """A loaded domain has no images: rebuilding the same cache would not help."""


def check_name(kind: str, name) -> str:
    """A name that becomes part of a file name must be one path component: no separators, not . or .."""
    if not isinstance(name, str) or not name.strip():
        raise CacheFormatError(f"has {kind} {name!r}, not a non-empty string")
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        raise CacheFormatError(f"has {kind} {name!r}, which is not a plain name (it holds a path separator or is . "
                               "or ..): a name must not lead outside a folder")
    return name


def open_cache(path) -> h5py.File:
    """Open `path` read-only after checking that it is a regular file holding only its own data."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CacheFormatError("does not exist") from None
    except OSError as e:
        raise CacheFormatError(f"cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CacheFormatError("is not a regular file (a folder, FIFO or device cannot be a cache)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheFormatError(f"is not readable HDF5 ({e})") from None
    try:
        check_self_contained(f)
    except BaseException:
        f.close()
        raise
    return f


def check_self_contained(f: h5py.File) -> None:
    """Every object is reached by a hard link and stores its data in this file."""
    problems = []

    def visit(name, link):
        if not isinstance(link, h5py.HardLink):
            kind = {h5py.ExternalLink: "an external link", h5py.SoftLink: "a soft link"}.get(type(link), "a link")
            target = f"{link.filename}:{link.path}" if isinstance(link, h5py.ExternalLink) else \
                getattr(link, "path", "?")
            problems.append(f"holds /{name}, {kind} to {target}")
            return None
        obj = f.get(name)
        if isinstance(obj, h5py.Dataset):
            if obj.is_virtual:
                problems.append(f"holds /{name}, a virtual dataset (its data lives in other files)")
            elif obj.external:
                problems.append(f"holds /{name}, whose data is stored in the external file {obj.external[0][0]}")
        return problems[0] if problems else None  # a non-None value stops the walk

    f.visititems_links(visit)
    if problems:
        raise CacheFormatError(f"{problems[0]}: a cache must hold all its data itself")


def check_declared(ds: h5py.Dataset, kind: str, shape: tuple) -> None:
    """Check a dataset's dtype ("float", "int" or "str"), its shape (an int, or None for any length, per
    dimension) and that the file stores the bytes it declares, all before it is read."""
    name = ds.name
    dt = ds.dtype
    ok = {"float": dt.kind == "f" and dt.itemsize <= 8,
          "int": dt.kind in "iu" and dt.itemsize <= 8,
          "str": (info := h5py.check_string_dtype(dt)) is not None and info.length is None}[kind]
    if not ok:
        raise CacheFormatError(f"has {name} of dtype {dt}, not {'variable-length string' if kind == 'str' else kind}")
    if len(ds.shape) != len(shape) or any(want is not None and got != want for got, want in zip(ds.shape, shape)):
        want = "[" + ", ".join("N" if w is None else str(w) for w in shape) + "]" if shape else "a scalar"
        raise CacheFormatError(f"has {name} of shape {list(ds.shape)}, not {want}")
    itemsize = VLEN_REFERENCE_BYTES if kind == "str" else dt.itemsize
    declared = int(np.prod(ds.shape, dtype=np.float64)) * itemsize
    stored = ds.id.get_storage_size()
    limit = stored * MAX_FILTER_RATIO if ds.id.get_create_plist().get_nfilters() else stored
    if declared > limit:
        raise CacheFormatError(f"declares {name} of shape {list(ds.shape)} ({declared:,} bytes) but stores only "
                               f"{stored:,} bytes of it")


@dataclass(frozen=True)
class Header:
    schema_version: int
    complete: bool
    dataset_name: str
    model_name: str
    embed_dim: int
    domains: tuple[str, ...]
    class_names: tuple[str, ...]


def _json_strings(attrs, key: str, kind: str) -> tuple[str, ...]:
    raw = attrs.get(key)
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        value = None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise CacheFormatError(f"has attribute {key} = {_show(raw)}, not a JSON list of strings")
    if len(set(value)) != len(value):
        raise CacheFormatError(f"has attribute {key} naming a {kind} twice")
    return tuple(check_name(kind, v) for v in value)


def _show(raw) -> str:
    text = repr(raw.item() if isinstance(raw, np.generic) else raw)
    return text if len(text) <= 60 else text[:57] + "..."


def _text_attr(attrs, key: str) -> str:
    raw = attrs.get(key)
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if not isinstance(raw, str):
        raise CacheFormatError(f"has attribute {key} = {_show(raw)}, not a string")
    return raw


def schema_version_of(attrs):
    """The schema version if it is an integer (not a bool, float or string); otherwise None."""
    v = attrs.get("schema_version")
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        return None
    return int(v)


def read_header(attrs) -> Header:
    """The root attributes federate relies on, typed and checked (schema_version first)."""
    version = schema_version_of(attrs)
    if version is None:
        raise CacheFormatError(f"has schema_version = {_show(attrs.get('schema_version'))}, not an integer "
                               f"(this fedclip reads version {SCHEMA_VERSION})")
    embed_dim = attrs.get("embed_dim")
    if isinstance(embed_dim, (bool, np.bool_)) or not isinstance(embed_dim, (int, np.integer)) or embed_dim < 1:
        raise CacheFormatError(f"has attribute embed_dim = {_show(embed_dim)}, not a positive integer")
    return Header(
        schema_version=version,
        complete=bool(attrs.get("complete", False)) if isinstance(attrs.get("complete", False), (bool, np.bool_))
        else False,
        dataset_name=check_name("dataset_name", _text_attr(attrs, "dataset_name")),
        model_name=_text_attr(attrs, "model_name"),
        embed_dim=int(embed_dim),
        domains=_json_strings(attrs, "domains", "domain"),
        class_names=_json_strings(attrs, "class_names", "class"),
    )


def check_text(text: np.ndarray, logit_scale: np.ndarray) -> float:
    """Text embeddings: finite, no zero vector. The logit scale: a finite positive scalar. Returns it."""
    if not np.isfinite(text).all():
        raise CacheFormatError("has non-finite text embeddings")
    zero = ~text.reshape(-1, text.shape[-1]).any(axis=1)
    if zero.any():
        t, c = divmod(int(np.flatnonzero(zero)[0]), text.shape[1])
        raise CacheFormatError(f"has an all-zero text embedding (template {t}, class {c}), which has no "
                               "direction")
    scale = float(logit_scale)
    if not np.isfinite(scale) or scale <= 0:
        raise CacheFormatError(f"has /text/logit_scale = {scale}, not a finite positive number")
    return scale


def check_domain(name: str, feats: np.ndarray, labels: np.ndarray, ids, num_classes: int, where: str) -> None:
    """A loaded domain: at least one image, finite non-zero embeddings, labels in range, unique ids."""
    n = len(ids)
    if n == 0:
        raise EmptyDomainError(f"domain {name} of {where} has no images (none of its files could be decoded, or "
                               f"its folder was empty: python -m extract.info {where} lists the skipped files)")
    squares = np.einsum("ij,ij->i", feats, feats)  # one pass: NaN and inf propagate, a zero row gives 0
    if not (np.isfinite(squares).all() and squares.all()):  # then word it exactly (a huge or tiny row may pass)
        if not np.isfinite(feats).all():
            raise CacheFormatError(f"domain {name} of {where} has non-finite embeddings")
        zero = ~feats.any(axis=1)
        if zero.any():
            raise CacheFormatError(f"domain {name} of {where} has an all-zero embedding "
                                   f"(id {ids[int(np.argmax(zero))]!r})")
    if labels.min() < 0 or labels.max() >= num_classes:
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise CacheFormatError(f"domain {name} of {where} has label {bad}, outside 0..{num_classes - 1} (its classes)")
    if len(set(ids)) != n:
        seen = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise CacheFormatError(f"domain {name} of {where} has duplicated id {dup!r}")
