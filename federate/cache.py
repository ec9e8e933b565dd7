"""Reading an embedding cache through its HDF5 schema (version 1): no transformers needed."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np

from .errors import ConfigError

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class DomainData:
    features: np.ndarray  # float32 [N, D], raw projected CLIP image embeddings
    labels: np.ndarray  # int64 [N]
    ids: tuple[str, ...]


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


def default_cache_path(cache_dir: str, dataset_name: str, model_name: str) -> Path:
    """The contract of DESIGN.md section 5 (the extract stage writes the same path)."""
    return Path(cache_dir) / dataset_name / (model_name.strip("/").replace("/", "--") + ".h5")


def load_cache(path: str | Path, model_name: str | None = None, domains: tuple[str, ...] | None = None) -> EmbeddingCache:
    """Load and validate a complete cache; jobs of one sweep process share the loaded arrays.
    With `domains`, only those domains' embeddings are read (a Flower client reads only its own)."""
    path = Path(path)
    if not path.exists():
        hint = f" (an interrupted extraction left {path}.partial: re-run extract to finish it)" \
            if Path(f"{path}.partial").exists() else ""
        raise ConfigError(f"no embedding cache at {path}{hint}; build it with: python -m extract "
                          f"dataset=<name> [model=...], or pass cache_file=<path>")
    st = os.stat(path)
    cache = _load(str(path.resolve()), st.st_mtime_ns, st.st_size, tuple(domains) if domains is not None else None)
    if model_name is not None and cache.model_name != model_name:
        raise ConfigError(f"{path} was built with model {cache.model_name!r}, not model.name={model_name!r}; "
                          f"pass model.name={cache.model_name} or extract a cache with that model")
    return cache


@lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int, size: int, only: tuple[str, ...] | None) -> EmbeddingCache:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ConfigError(f"cannot read {path} as HDF5 ({e}); rebuild it with python -m extract") from None
    with f:
        a = f.attrs
        if a.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(f"{path} has cache schema version {a.get('schema_version')}, this fedclip reads "
                              f"version {SCHEMA_VERSION}; rebuild it with python -m extract ... overwrite=true")
        if not bool(a.get("complete", False)):
            raise ConfigError(f"{path} is not complete (its extraction did not finish); re-run the extract "
                              "command that builds it")
        domains, names = {}, json.loads(a["domains"])
        unknown = [d for d in only or () if d not in names]
        if unknown:
            raise ConfigError(f"domain {unknown[0]!r} is not in {path}; its domains: {', '.join(names)}")
        for name in names:
            if only is not None and name not in only:
                continue
            g = f[f"domains/{name}"]
            feats = g["image_embeddings"][()].astype(np.float32)
            if not np.isfinite(feats).all():
                raise ConfigError(f"domain {name} of {path} has non-finite embeddings; rebuild the cache "
                                  "(python -m extract ... overwrite=true)")
            ids = tuple(s.decode() if isinstance(s, bytes) else s for s in g["ids"][()])
            domains[name] = DomainData(feats, g["labels"][()].astype(np.int64), ids)
        text = f["text/embeddings"][()].astype(np.float32)
        if not np.isfinite(text).all():
            raise ConfigError(f"the text embeddings of {path} are non-finite; rebuild the cache")
        return EmbeddingCache(
            path=path, model_name=str(a["model_name"]), dataset_name=str(a["dataset_name"]),
            embed_dim=int(a["embed_dim"]), class_names=tuple(json.loads(a["class_names"])), text=text,
            logit_scale=float(f["text/logit_scale"][()]),
            model_num_parameters=int(a.get("model_num_parameters", 0)), domains=domains, all_domains=tuple(names))
