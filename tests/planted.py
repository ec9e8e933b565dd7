"""Synthetic caches written through the HDF5 schema (version 1), for federate tests and benchmarks.

`planted` puts the class signal in the first C dimensions and a per-domain "style" offset in the next S;
the class prompts also have random components in the style dimensions, so the style biases zero-shot
CLIP towards some classes while an adapter that attends to the class dimensions is immune to it.

`write_cache` writes the checksums that `extract` writes (and `federate` verifies); `checksums=False`
writes a cache like those of an older fedclip, without them.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from extract.identity import buffer_sha256, identity_sha256, strings_sha256


def write_cache(path, domains: dict[str, tuple[np.ndarray, np.ndarray]], text: np.ndarray, *,
                model_name="fedclip/planted", dataset_name="planted", class_names=None, logit_scale=100.0,
                complete=True, schema_version=1, model_num_parameters=151_277_313, model_fingerprint=None,
                ids=None, checksums=True) -> Path:
    """`ids`: {domain: list of ids} instead of the default "<domain>/<row>"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    C, D = text.shape[-2:]
    with h5py.File(path, "w") as f:
        f.attrs.update(schema_version=schema_version, complete=complete, model_name=model_name,
                       dataset_name=dataset_name, embed_dim=D, domains=json.dumps(list(domains)),
                       class_names=json.dumps(class_names or [f"class{c}" for c in range(C)]),
                       prompt_templates=json.dumps(["a picture of a {}"]), model_num_parameters=model_num_parameters)
        if model_fingerprint is not None:
            f.attrs["model_fingerprint"] = model_fingerprint
        if checksums:
            f.attrs["identity_sha256"] = identity_sha256(f.attrs)

        def put(name, data, strings=False):
            ds = f.create_dataset(name, data=np.array(data, dtype=object) if strings else data,
                                  dtype=h5py.string_dtype() if strings else None)
            if checksums:
                ds.attrs["sha256"] = strings_sha256(data) if strings else buffer_sha256(np.ascontiguousarray(data))

        put("text/embeddings", text.reshape(-1, C, D).astype(np.float32))
        put("text/logit_scale", np.float32(logit_scale))
        for name, (x, y) in domains.items():
            put(f"domains/{name}/image_embeddings", np.ascontiguousarray(x, np.float32))
            put(f"domains/{name}/labels", np.asarray(y, np.int64))
            put(f"domains/{name}/ids", list((ids or {}).get(name) or [f"{name}/{i:05d}" for i in range(len(y))]),
                strings=True)
    return path


def planted(sizes: dict[str, int], classes=5, dim=64, style_dims=16, signal=1.0, style=3.0, noise=0.3, seed=0):
    """Domains of labelled embeddings and class prompts [C, D] as described in the module docstring."""
    rng = np.random.default_rng(seed)
    text = np.zeros((classes, dim))
    text[:, :classes] = np.eye(classes)
    text[:, classes:classes + style_dims] = rng.normal(0, 1.0, (classes, style_dims))
    domains = {}
    for name, n in sizes.items():
        offset = np.zeros(dim)
        offset[classes:classes + style_dims] = rng.normal(0, style, style_dims)
        y = rng.integers(0, classes, n)
        x = noise * rng.normal(size=(n, dim)) + offset
        x[np.arange(n), y] += signal * 4
        domains[name] = (x + 1.0, y)  # a positive shift keeps g(x) * x informative
    return domains, text


def corrupt(good, tmp_path, edit, name="bad.h5"):
    """A copy of the cache `good` in tmp_path, changed in place by `edit(h5py.File)`."""
    import shutil

    path = tmp_path / name
    shutil.copy(good, path)
    with h5py.File(path, "a") as f:
        edit(f)
    return path


def one_line(error: type[Exception], fn, *match) -> str:
    """`fn()` raises `error` in one line holding every `match`; the line."""
    import pytest

    with pytest.raises(error) as e:
        fn()
    text = str(e.value)
    assert "\n" not in text and all(m in text for m in match), text
    return text


def refused(path, *match, **kw) -> str:
    """federate's load_cache refuses `path` in one line holding every `match`; the line."""
    from federate.cache import _load, load_cache
    from federate.errors import ConfigError

    _load.cache_clear()
    return one_line(ConfigError, lambda: load_cache(path, **kw), *match)
