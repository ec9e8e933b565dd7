"""What a cache *is*, by content: the model's fingerprint, the cache's checksums, canonical names.

Standard library only (hashlib, json, pathlib): `federate` imports this module to check a shared cache
against a local copy of the weights without importing transformers, torch or even numpy.

- `model_fingerprint(directory)`: sha256 over the weights (every top-level `*.safetensors` file) and the
  model, tokenizer and processor configs, by sorted file name. It does not depend on where the folder is:
  the same weights copied to another path (or re-saved by another transformers version, which only
  changes the version stamps in the JSON files) have the same fingerprint.
- `model_display_name(name_or_path)`: the `model_name` a cache records: the hub id, or a local folder's
  base name (never an absolute path).
- `identity_sha256(attrs)`, `buffer_sha256(array)`, `strings_sha256(strings)`: the checksums written by
  `extract` and verified by `federate` and `python -m extract.info`.
- `canonical_domain(name)`: one spelling for a domain whatever the source ("Real World" -> "Real_World").
"""
from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path

FINGERPRINT_VERSION = "fedclip-model-fingerprint-v1"
WEIGHTS_SUFFIX = ".safetensors"
# The model, tokenizer and processor configs that decide what the embeddings are (when present).
CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
                "processor_config.json")
# Keys that save_pretrained stamps into JSON files without changing the model: left out of the hash.
VOLATILE_KEYS = frozenset({"_name_or_path", "name_or_path", "transformers_version", "_commit_hash"})

# Root attributes that say what a cache is; `identity_sha256` covers them (a missing one hashes as null).
IDENTITY_ATTRS = ("schema_version", "model_name", "model_fingerprint", "dataset_name", "embed_dim", "domains",
                  "class_names", "prompt_names", "prompt_templates", "image_dtype", "model_num_parameters",
                  "inputs_fingerprint")


def canonical_domain(name: str) -> str:
    """One name per domain whatever the source: whitespace runs become "_" ("Real World" -> "Real_World")."""
    return re.sub(r"\s+", "_", str(name).strip())


def is_local_model(name_or_path: str) -> bool:
    return Path(str(name_or_path)).expanduser().is_dir()


def model_display_name(name_or_path: str) -> str:
    """The cache's `model_name`: a local folder's base name, otherwise the name itself (a hub id)."""
    p = Path(str(name_or_path)).expanduser()
    if p.is_dir():
        return p.resolve().name
    return str(name_or_path).strip().strip("/")


def cache_file_stem(name_or_path: str) -> str:
    """The model part of the default cache file name (`/` -> `--`; never an absolute path)."""
    return model_display_name(name_or_path).replace("/", "--")


def fingerprint_files(directory) -> list[Path]:
    d = Path(directory)
    files = [p for p in d.iterdir() if p.is_file() and (p.name.endswith(WEIGHTS_SUFFIX) or p.name in CONFIG_FILES)]
    return sorted(files, key=lambda p: p.name)


def _file_digest(p: Path) -> bytes:
    if p.suffix == ".json":
        raw = p.read_bytes()
        try:
            data = json.loads(raw)
        except ValueError:
            return hashlib.sha256(raw).digest()
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in VOLATILE_KEYS}
        return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).digest()
    with open(p, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").digest()


@lru_cache(maxsize=8)
def _fingerprint(directory: str, signature: tuple) -> str:
    h = hashlib.sha256(FINGERPRINT_VERSION.encode() + b"\n")
    for p in fingerprint_files(directory):
        h.update(p.name.encode() + b"\0" + _file_digest(p))
    return "sha256:" + h.hexdigest()


def model_fingerprint(directory) -> str:
    """sha256 of a model folder's weights and configs ("sha256:<hex>"); independent of the folder's path.
    Computed once per process for an unchanged folder (the files' sizes and times are the key)."""
    d = Path(directory).expanduser().resolve()
    files = fingerprint_files(d)
    if not any(p.name.endswith(WEIGHTS_SUFFIX) for p in files):
        raise FileNotFoundError(f"no *{WEIGHTS_SUFFIX} weights in {d}")
    signature = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _fingerprint(str(d), signature)


def short(fingerprint: str | None) -> str:
    """A fingerprint as shown in messages: "sha256:1a2b3c4d5e6f"."""
    return (fingerprint or "none")[:19]


# --- checksums of a cache -----------------------------------------------------------------------------

def buffer_sha256(buffer) -> str:
    """sha256 of a C-contiguous buffer (a numpy array's bytes as stored)."""
    return hashlib.sha256(buffer).hexdigest()


def strings_sha256(strings) -> str:
    """sha256 of UTF-8 strings joined by newlines. Bytes from HDF5 are hashed as stored (the UTF-8 of the
    strings written), so a string that is not valid UTF-8 is hashed, not a crash; its reader says so."""
    data = b"\n".join(s if isinstance(s, bytes) else str(s).encode("utf-8", "surrogateescape") for s in strings)
    return hashlib.sha256(data).hexdigest()


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if hasattr(value, "item") and not isinstance(value, (str, int, float, bool)):
        return value.item()  # a numpy scalar from h5py
    return value


def identity_sha256(attrs) -> str:
    """sha256 over the identity attributes (`IDENTITY_ATTRS`) of a cache's root, as canonical JSON."""
    plain = {k: _plain(attrs[k]) if k in attrs else None for k in IDENTITY_ATTRS}
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()
