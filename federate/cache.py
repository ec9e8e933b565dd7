"""Reading an embedding cache through its HDF5 schema (version 1; docs/cache.md): no transformers needed.

The file is checked as hostile input before anything is read (extract/cache_checks.py: a regular file
holding only its own data, typed attributes, plain names, declared shapes and sizes). Everything that is
read is then verified: the identity attributes (one sha256 over them), the text embeddings, the logit
scale, and each loaded domain's embeddings, labels and ids (their sha256 attributes); vectors must be
finite and non-zero, labels in range, ids unique, a loaded domain non-empty. A problem is a one-line
ConfigError. The model
is checked by content: a local model folder is fingerprinted (extract/identity.py, standard library only)
and compared with the cache's `model_fingerprint`, so the same weights at another path are accepted.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np

from extract.cache_checks import (SCHEMA_VERSION, CacheFormatError, EmptyDomainError, check_declared, check_domain,
                                  check_text, open_cache, read_header)
from extract.identity import (buffer_sha256, cache_file_stem, canonical_domain, identity_sha256,  # noqa: F401
                              is_local_model, model_fingerprint, short, strings_sha256)

from .errors import ConfigError

# What messages suggest to rebuild a cache; load_cache puts the user's own extract command in its place.
REBUILD = "the python -m extract command that built it, plus overwrite=true"


@dataclass(frozen=True)
class DomainData:
    features: np.ndarray  # float32 [N, D], raw projected CLIP image embeddings (a view of the cache's `features`)
    labels: np.ndarray  # int64 [N] (a view of the cache's `labels`)
    ids: tuple[str, ...]
    start: int = 0  # the domain's first row in the cache's `features` and `labels`


@dataclass(frozen=True)
class EmbeddingCache:
    path: str
    model_name: str
    dataset_name: str
    embed_dim: int
    class_names: tuple[str, ...]
    text: np.ndarray  # float32 [T, C, D], raw projected text embeddings
    logit_scale: float
    model_num_parameters: int
    domains: dict[str, DomainData]
    all_domains: tuple[str, ...]  # every domain of the file, also those not loaded
    model_fingerprint: str = ""  # sha256 of the weights and configs ("" in caches of an older fedclip)
    inputs_fingerprint: str = ""  # sha256 of every domain's ids and labels (extract.cache.inputs_fingerprint)
    identity_sha256: str = ""  # sha256 of the identity attributes (model, dataset, domains, classes, prompts)
    checksums: dict = field(default_factory=dict)  # HDF5 dataset path -> sha256 of what was read and verified
    verify_seconds: float = 0.0  # time spent reading and verifying (the first load of this process)
    # every loaded domain's rows, one after another (DomainData.start): clients and evaluation index these
    # rows instead of copying them, so a run holds the embeddings once
    features: np.ndarray | None = None  # float32 [N, D]
    labels: np.ndarray | None = None  # int64 [N]
    # {domain: ids} of the rows a class subset (dataset.classes, federate/partition.py) leaves out: a split
    # file of every class reads with them dropped
    left_out: dict = field(default_factory=dict)


def case_hint(name: str, names) -> str:
    """"; did you mean <n>? (names are case-sensitive)" when `name` matches one of `names` but for case."""
    same = [n for n in names if str(n).lower() == str(name).lower() and n != name]
    return f"; did you mean {same[0]}? (names are case-sensitive)" if same else ""


def default_cache_path(cache_dir: str, dataset_name: str, model_name_or_path: str) -> Path:
    """<cache_dir>/<dataset>/<model>.h5, the path extract writes: <model> is a hub id with "/" -> "--", or
    a local model folder's base name (never its absolute path)."""
    return Path(cache_dir) / dataset_name / (cache_file_stem(model_name_or_path) + ".h5")


def load_cache(path: str | Path, model_name: str | None = None, domains: tuple[str, ...] | None = None,
               extract_command: str | None = None) -> EmbeddingCache:
    """Load, verify and validate a complete cache; jobs of one sweep process share the loaded arrays.
    With `domains`, only those domains' embeddings are read and verified (a Flower client reads only its
    own). `model_name` is a hub id (it must be the cache's `model_name`) or a local model folder (its
    fingerprint must be the cache's `model_fingerprint`). `extract_command` (the user's own `python -m
    extract ...`, see extract.commands) is what messages suggest to build or rebuild the cache."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        hint = f" (an interrupted extraction left {path}.partial: re-run extract to finish it)" \
            if Path(f"{path}.partial").exists() else ""
        build = f"build it with: {extract_command}" if extract_command else \
            "build it with python -m extract (the same dataset, model and cache_dir)"
        raise ConfigError(f"no embedding cache at {path}{hint}; {build}, or point cache_file at an existing cache")
    try:
        st = os.stat(path)
        only = tuple(canonical_domain(d) for d in domains) if domains is not None else None
        cache = _load(str(path.resolve()), st.st_mtime_ns, st.st_size, only)
        if model_name is not None:
            check_model(cache, str(model_name), path)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except ConfigError as e:
        if not extract_command:
            raise
        raise ConfigError(str(e).replace(REBUILD, f"{extract_command} overwrite=true")) from None
    return cache


def derived(store: dict, cache: EmbeddingCache, key, make):
    """`make()`, kept in `store` for this loaded cache and `key`, so that a sweep's points share what is built
    from one cache (its tensors on a device, a class subset). The cache is held while kept, so its id names
    it; two caches' worth at most, as a process works on one or two at a time."""
    name = (id(cache.features), key)
    if name not in store:
        while len(store) >= 2:
            store.pop(next(iter(store)))
        store[name] = (cache, make())
    return store[name][1]


def folder_fingerprint(folder) -> str:
    """The content fingerprint of a local model folder (its weights and configs), or one line why not."""
    try:
        return model_fingerprint(folder)
    except OSError as e:
        raise ConfigError(f"cannot fingerprint the model folder {folder}: {e}") from None


def check_model(cache: EmbeddingCache, model_name: str, path) -> None:
    """Share by what the cache is: same weights (by fingerprint) or the same hub id; else one line."""
    if is_local_model(model_name):
        if not cache.model_fingerprint:
            raise ConfigError(f"{path} records no model fingerprint (an older fedclip wrote it), so it cannot be "
                              f"checked against the weights in {model_name}; rebuild it with {REBUILD}, or pass "
                              f"model.name={cache.model_name}")
        mine = folder_fingerprint(model_name)
        if mine != cache.model_fingerprint:
            raise ConfigError(f"{path} was built with model {cache.model_name!r} ({short(cache.model_fingerprint)}), "
                              f"but the weights in {model_name} differ ({short(mine)}); pass model.name={cache.model_name} "
                              "(or a local folder with the cache's weights), or extract a cache with these weights")
    elif model_name.strip().strip("/") != cache.model_name:
        raise ConfigError(f"{path} was built with model {cache.model_name!r}, not model.name={model_name!r}; pass "
                          f"model.name={cache.model_name} (or a local folder with the same weights), or extract a cache "
                          "with that model")


def _stale(path: str, what: str) -> ConfigError:
    return ConfigError(f"{path} has no checksum for {what} (an older fedclip wrote it) and cannot be verified; "
                       f"rebuild it: {REBUILD}")


def _mismatch(path: str, what: str) -> ConfigError:
    return ConfigError(f"checksum mismatch in {what} of {path}: the file was changed or damaged after it was "
                       f"written; get a fresh copy or rebuild it: {REBUILD}")


def _verified(ds: h5py.Dataset, path: str, strings: bool = False, out: np.ndarray | None = None):
    """Read a dataset and check it against its sha256 attribute (of the bytes as stored). With `out`, the
    values land there (converted to its dtype) and `out` is returned."""
    expected = ds.attrs.get("sha256")
    if expected is None:
        raise _stale(path, ds.name)
    if out is not None and ds.dtype == out.dtype and ds.size:
        ds.read_direct(out)  # straight into the pooled array: no second copy
        data = out
    else:
        data = ds[()]
    if strings:
        actual = strings_sha256(np.atleast_1d(data))
        try:
            data = [s.decode() if isinstance(s, bytes) else str(s) for s in np.atleast_1d(data)]
        except UnicodeDecodeError:
            raise ConfigError(f"{path} has strings in {ds.name} that are not UTF-8 text; rebuild it with "
                              f"{REBUILD}") from None
    else:
        actual = buffer_sha256(np.ascontiguousarray(data))
    if actual != (expected.decode() if isinstance(expected, bytes) else str(expected)):
        raise _mismatch(path, ds.name)
    if out is not None and data is not out:
        out[...] = data
        return out
    return data


@lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int, size: int, only: tuple[str, ...] | None) -> EmbeddingCache:
    t0 = time.perf_counter()
    try:
        with open_cache(path) as f:
            return _read(f, path, only, t0)
    except CacheFormatError as e:
        text = str(e) if str(e).startswith("domain ") else f"{path} {e}"
        raise ConfigError(f"{text}; it is not a usable fedclip cache: rebuild it with {REBUILD}") from None
    except (KeyError, ValueError, TypeError, OSError) as e:  # a structure the schema does not allow
        raise ConfigError(f"{path} does not follow the cache schema ({type(e).__name__}: {e}); rebuild it with "
                          f"{REBUILD}") from None


def _read(f: h5py.File, path: str, only, t0: float) -> EmbeddingCache:
    a = f.attrs
    header = read_header(a)
    if header.schema_version != SCHEMA_VERSION:
        raise ConfigError(f"{path} has cache schema version {header.schema_version}, this fedclip reads version "
                          f"{SCHEMA_VERSION}; rebuild it with {REBUILD}")
    if not header.complete:
        raise ConfigError(f"{path} is not complete (its extraction did not finish); re-run the extract "
                          "command that builds it")
    if "identity_sha256" not in a:
        raise _stale(path, "its identity attributes")
    if identity_sha256(a) != str(a["identity_sha256"]):
        raise _mismatch(path, "the identity attributes (model, dataset, domains, classes, prompts)")
    if "text" not in f or "embeddings" not in f["text"] or "logit_scale" not in f["text"]:
        raise ConfigError(f"{path} has no /text/embeddings or /text/logit_scale; rebuild it with {REBUILD}")
    names, class_names, embed_dim = header.domains, header.class_names, header.embed_dim
    unknown = [d for d in only or () if d not in names]
    if unknown:
        raise ConfigError(f"domain {unknown[0]!r} is not in {path}; its domains: {', '.join(names)}")
    check_declared(f["text/embeddings"], "float", (None, len(class_names), embed_dim))
    check_declared(f["text/logit_scale"], "float", ())
    text = _verified(f["text/embeddings"], path).astype(np.float32, copy=False)
    logit_scale = check_text(text, _verified(f["text/logit_scale"], path))
    wanted = [name for name in names if only is None or name in only]
    sizes = [_domain_size(f, path, name, embed_dim) for name in wanted]
    features = np.empty((sum(sizes), embed_dim), dtype=np.float32)  # every domain's rows, read in place
    labels = np.empty(sum(sizes), dtype=np.int64)
    domains, start = {}, 0
    for name, n in zip(wanted, sizes):
        rows = slice(start, start + n)
        try:
            domains[name] = _read_domain(f, path, name, len(class_names), features[rows], labels[rows], start)
        except EmptyDomainError as e:  # rebuilding the same cache would not help
            others = ",".join(d for d in names if d != name)
            raise ConfigError(f"{e}; extract the cache again with images in every domain, or without this one "
                              f"(dataset.domains=[{others}])") from None
        start += n
    return EmbeddingCache(
        path=path, model_name=str(a["model_name"]), dataset_name=str(a["dataset_name"]),
        embed_dim=embed_dim, class_names=class_names, text=text, logit_scale=logit_scale,
        model_num_parameters=int(a.get("model_num_parameters", 0)), domains=domains, all_domains=tuple(names),
        model_fingerprint=str(a.get("model_fingerprint", "")), inputs_fingerprint=str(a.get("inputs_fingerprint", "")),
        identity_sha256=str(a["identity_sha256"]),
        checksums=_checksums(f, ["text/embeddings", "text/logit_scale",
                                 *(f"domains/{d}/{k}" for d in domains for k in ("image_embeddings", "labels", "ids"))]),
        verify_seconds=time.perf_counter() - t0, features=features, labels=labels)


def _checksums(f: h5py.File, names: list[str]) -> dict[str, str]:
    """The verified sha256 attributes of the datasets read: what a run computed on, by content."""
    out = {}
    for name in names:
        value = f[name].attrs["sha256"]
        out[name] = value.decode() if isinstance(value, bytes) else str(value)
    return out


def _domain_size(f: h5py.File, path: str, name: str, embed_dim: int) -> int:
    """A domain's row count, once its datasets declare the shapes and types the schema allows."""
    if f"domains/{name}" not in f:
        raise ConfigError(f"domain {name} is listed in {path} but has no /domains/{name} group; rebuild it with "
                          f"{REBUILD}")
    g = f[f"domains/{name}"]
    check_declared(g["ids"], "str", (None,))
    n = g["ids"].shape[0]
    check_declared(g["labels"], "int", (n,))
    check_declared(g["image_embeddings"], "float", (n, embed_dim))
    return n


def _read_domain(f: h5py.File, path: str, name: str, num_classes: int, features: np.ndarray, labels: np.ndarray,
                 start: int) -> DomainData:
    """Read and verify a domain into its rows of the pooled arrays (`features`, `labels`: views)."""
    g = f[f"domains/{name}"]
    feats = _verified(g["image_embeddings"], path, out=features)
    labels = _verified(g["labels"], path, out=labels)
    ids = tuple(_verified(g["ids"], path, strings=True))
    check_domain(name, feats, labels, ids, num_classes, path)
    return DomainData(feats, labels, ids, start)
