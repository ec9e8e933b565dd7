"""The hub layout of a cache: file names, the `datasets` features of each subset, typed HDF5 attributes, and
the provenance block of the dataset card (`fedclip:` in README.md's YAML), written by export and checked,
field by field, before import reads a byte of Parquet.

A folder in the hub layout holds

    README.md                                    the card: YAML (configs, dataset_info, license, tags, fedclip)
    data/images/<domain>/part-00000.parquet      one subset `images`: id, label, domain, embedding
    data/prompts/part-00000.parquet              subset `prompts`: template, label, prompt_name, prompt, embedding

The card's `fedclip` block records every group and dataset of the HDF5 file (each attribute with its type,
each dataset's dtype and shape; the skipped lists and the logit scale by value) and the sha256, size and
row count of every data file, so import rebuilds the same file: the same arrays, attributes and identity.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np

from ..errors import ExtractError

FORMAT = "fedclip-hub-v1"
CARD = "README.md"
IMAGES, PROMPTS = "images", "prompts"
# What the hub or huggingface_hub add beside the exported files: allowed in a folder, never read.
HUB_FILES = (".gitattributes",)
HUB_FOLDERS = (".cache/huggingface/",)  # huggingface_hub's download metadata in a local_dir
# Embedding values per Parquet file (65,536 rows of 512: 128 MiB in float32): export and import hold about one
# file's rows at a time, and the hub handles files of this size well. Counted in values, not bytes: writing
# float16 costs memory per value.
SHARD_VALUES = 2**25
MAX_CARD_BYTES = 64 * 2**20  # a card larger than this is not one export wrote (a DomainNet card is ~100 kB)
SHA256 = re.compile(r"[0-9a-f]{64}")
GROUP = re.compile(r"/|(/[^/\0]+)+")
ATTR_TYPES = ("str", "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32",
              "float64")
EMBEDDING_DTYPES = ("float16", "float32", "float64")
LABEL_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def domain_folder(domain: str) -> str:
    """The folder of a domain's files: its name, percent-encoded where a path or the `datasets` library's
    globs would treat it specially (a leading '.' or '_' hides a file from `datasets`)."""
    name = quote(domain, safe="")
    return "%" + f"{ord(name[0]):02X}" + name[1:] if name[0] in "._" else name


def shard_rows(embed_dim: int) -> int:
    return max(1, SHARD_VALUES // embed_dim)


def shard_names(prefix: str, rows: int, per_shard: int) -> list[str]:
    """`<prefix>/part-00000.parquet`, ... for `rows` rows (none for an empty domain)."""
    return [f"{prefix}/part-{k:05d}.parquet" for k in range(math.ceil(rows / per_shard))]


def image_files(domain: str, rows: int, per_shard: int) -> list[str]:
    return shard_names(f"data/{IMAGES}/{domain_folder(domain)}", rows, per_shard)


def prompt_files(rows: int, per_shard: int) -> list[str]:
    return shard_names(f"data/{PROMPTS}", rows, per_shard)


def image_features(class_names, embed_dim: int, dtype: str):
    from datasets import ClassLabel, Features, List, Value

    return Features({"id": Value("string"), "label": ClassLabel(names=list(class_names)), "domain": Value("string"),
                     "embedding": List(Value(dtype), length=embed_dim)})


def prompt_features(class_names, embed_dim: int, dtype: str):
    from datasets import ClassLabel, Features, List, Value

    return Features({"template": Value("string"), "label": ClassLabel(names=list(class_names)),
                     "prompt_name": Value("string"), "prompt": Value("string"),
                     "embedding": List(Value(dtype), length=embed_dim)})


# --- typed attributes ------------------------------------------------------------------------------------

def encode_attr(name: str, value, where: str) -> dict:
    """An HDF5 attribute as {name, type, value}: what import writes back with the same HDF5 type."""
    if isinstance(value, str):
        return {"name": name, "type": "str", "value": value}
    if isinstance(value, (bool, np.bool_)):
        return {"name": name, "type": "bool", "value": bool(value)}
    if isinstance(value, np.generic) and value.dtype.name in ATTR_TYPES:
        item = value.item()
        if isinstance(item, float) and not math.isfinite(item):
            raise ExtractError(f"{where} has attribute {name} = {item}, which the hub layout does not carry "
                               "(not finite)")
        return {"name": name, "type": value.dtype.name, "value": item}
    raise ExtractError(f"{where} has attribute {name} of type {type(value).__name__}"
                       f"{' ' + str(value.dtype) if hasattr(value, 'dtype') else ''}, which the hub layout does not "
                       "carry (fedclip writes strings, booleans and numbers)")


def decode_attr(entry: dict):
    """The value to write back: a str, or the numpy scalar of the recorded type (checked by `Check`)."""
    kind, value = entry["type"], entry["value"]
    if kind == "str":
        return value
    if kind == "bool":
        return np.bool_(value)
    return np.dtype(kind).type(value)


def dtype_name(dtype) -> str:
    """'str' for a variable-length UTF-8 string dtype, else the numpy name ('float32')."""
    import h5py

    info = h5py.check_string_dtype(dtype)
    if info is not None:
        return "str" if info.length is None and info.encoding == "utf-8" else f"string ({info})"
    if dtype.byteorder == ">":
        return f"{dtype.name} (big-endian)"
    return dtype.name


# --- checking a card's provenance block ------------------------------------------------------------------

class Damaged(ValueError):
    """A field of the provenance block is missing or has the wrong type or value."""


class Check:
    """Typed reads of the provenance block, each failure naming the field (`fedclip.domains[1].rows`)."""

    def __init__(self, value, path: str = "fedclip"):
        self.value, self.path = value, path

    def fail(self, what: str):
        shown = repr(self.value)
        raise Damaged(f"{self.path} is {shown if len(shown) <= 60 else shown[:57] + '...'}, not {what}")

    def __getitem__(self, key) -> "Check":
        if isinstance(key, int):
            if not isinstance(self.value, list) or not -len(self.value) <= key < len(self.value):
                self.fail(f"a list of at least {key + 1} items")
            return Check(self.value[key], f"{self.path}[{key}]")
        if not isinstance(self.value, dict):
            self.fail("a mapping")
        if key not in self.value:
            raise Damaged(f"{self.path}.{key} is missing")
        return Check(self.value[key], f"{self.path}.{key}")

    def get(self, key) -> "Check | None":
        return self[key] if isinstance(self.value, dict) and self.value.get(key) is not None else None

    def dict(self) -> dict:
        if not isinstance(self.value, dict):
            self.fail("a mapping")
        return self.value

    def list(self) -> list["Check"]:
        if not isinstance(self.value, list):
            self.fail("a list")
        return [self[i] for i in range(len(self.value))]

    def str(self, pattern: re.Pattern | None = None, choices=None) -> str:
        if not isinstance(self.value, str) or (pattern and not pattern.fullmatch(self.value)) or \
                (choices and self.value not in choices):
            self.fail(f"one of {', '.join(choices)}" if choices else "a sha256 (64 hex digits)" if pattern is SHA256
                      else "a string")
        return self.value

    def int(self, minimum: int = 0) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int) or self.value < minimum:
            self.fail(f"an integer >= {minimum}")
        return self.value

    def strings(self) -> list[str]:
        return [c.str() for c in self.list()]


def check_attrs(check: Check) -> dict:
    """{name: value to write} from a list of typed attributes, each type and value checked."""
    out = {}
    for item in check.list():
        name = item["name"].str()
        kind = item["type"].str(choices=ATTR_TYPES)
        value = item["value"]
        if name in out:
            value.fail(f"the only attribute named {name!r}")
        if kind == "str":
            value.str()
        elif kind == "bool":
            if not isinstance(value.value, bool):
                value.fail("a boolean")
        elif kind.startswith(("int", "uint")):
            info = np.iinfo(kind)
            if isinstance(value.value, bool) or not isinstance(value.value, int) or \
                    not info.min <= value.value <= info.max:
                value.fail(f"an integer of type {kind}")
        elif isinstance(value.value, bool) or not isinstance(value.value, (int, float)) or \
                not math.isfinite(value.value):
            value.fail(f"a finite number of type {kind}")
        out[name] = decode_attr(item.dict())
    return out


@dataclass(frozen=True)
class DatasetRecord:
    """One HDF5 dataset as the card records it."""
    path: str
    dtype: str
    shape: tuple[int, ...]
    attrs: dict  # name -> value to write
    sha256: str
    values: tuple | None = None  # the strings of a skipped list, the logit scale


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    size: int
    rows: int


@dataclass(frozen=True)
class Manifest:
    """What a card says about the cache it was exported from, checked."""
    identity_sha256: str
    groups: dict  # HDF5 group path -> {attribute: value}
    datasets: dict  # HDF5 dataset path -> DatasetRecord
    domains: tuple  # the cache's domains, in order
    class_names: tuple
    embed_dim: int
    image_files: dict  # domain -> [file, ...] in row order
    prompt_files: tuple
    files: dict  # path -> FileRecord

    def rows(self, domain: str) -> int:
        return self.datasets[f"/domains/{domain}/ids"].shape[0]


def dataset_paths(domain: str) -> tuple[str, ...]:
    return tuple(f"/domains/{domain}/{k}" for k in ("image_embeddings", "labels", "ids"))


SKIPPED = ("skipped/ids", "skipped/reasons")
TEXT, SCALE = "/text/embeddings", "/text/logit_scale"


def read_manifest(block) -> Manifest:
    """Check the card's `fedclip` block (raises Damaged naming the field) and return what it says."""
    from ..cache_checks import SCHEMA_VERSION, CacheFormatError, read_header
    from ..identity import identity_sha256

    c = Check(block)
    if c["format"].str() != FORMAT:
        c["format"].fail(f"{FORMAT!r} (this fedclip reads that format)")
    if c["complete"].value is not True:
        raise Damaged("fedclip.complete is not true: the export that wrote this folder did not finish")
    cache = c["cache"]
    identity = cache["identity_sha256"].str(SHA256)
    groups = {}
    for path, attrs in cache["groups"].dict().items():
        if not isinstance(path, str) or not GROUP.fullmatch(path) or any(p in (".", "..") for p in path.split("/")):
            raise Damaged(f"fedclip.cache.groups names the group {path!r}, not an HDF5 path (/, /text, /domains/a)")
        groups[path] = check_attrs(Check(attrs, f"fedclip.cache.groups[{path!r}]"))
    if "/" not in groups:
        raise Damaged("fedclip.cache.groups has no root group '/'")
    try:
        header = read_header(groups["/"])
    except CacheFormatError as e:
        raise Damaged(f"fedclip.cache.groups['/'] {e}") from None
    if header.schema_version != SCHEMA_VERSION or not header.complete:
        what = "an incomplete cache" if not header.complete else f"a cache of schema version {header.schema_version}"
        raise Damaged(f"fedclip.cache.groups['/'] describes {what}, not a complete cache of schema version "
                      f"{SCHEMA_VERSION}")
    if identity_sha256(groups["/"]) != identity or groups["/"].get("identity_sha256") != identity:
        raise Damaged("fedclip.cache.groups['/'] holds root attributes whose identity is not "
                      f"fedclip.cache.identity_sha256 ({identity[:12]}): an attribute was changed")
    records = {}
    for path, entry in cache["datasets"].dict().items():
        d = Check(entry, f"fedclip.cache.datasets[{path!r}]")
        shape = tuple(s.int() for s in d["shape"].list())
        attrs = check_attrs(d["attributes"])
        sha = attrs.get("sha256")
        if not isinstance(sha, str) or not SHA256.fullmatch(sha):
            d["attributes"].fail("attributes with a sha256")
        values = None
        if d.get("values") is not None:
            values = tuple(d["values"].strings()) if path != SCALE else (d["values"][0].value,)
        records[path] = DatasetRecord(path, d["dtype"].str(), shape, attrs, sha, values)
    domains, classes, dim = header.domains, header.class_names, header.embed_dim
    expected = {TEXT, SCALE} | {p for name in domains for p in dataset_paths(name)}
    skipped = {f"/domains/{name}/{k}" for name in domains for k in SKIPPED}
    unknown = sorted(set(records) - expected - skipped)
    if unknown:
        raise Damaged(f"fedclip.cache.datasets lists {unknown[0]}, which the hub layout does not map")
    missing = sorted(expected - set(records))
    if missing:
        raise Damaged(f"fedclip.cache.datasets lacks {missing[0]}")
    _check_shapes(records, domains, len(classes), dim)
    image = {}
    images = c["images"]
    for name in domains:
        image[name] = tuple(f.str() for f in images[name].list())
    files = {}
    for path, entry in c["files"].dict().items():
        f = Check(entry, f"fedclip.files[{path!r}]")
        files[path] = FileRecord(f["sha256"].str(SHA256), f["bytes"].int(), f["rows"].int())
    prompts = tuple(f.str() for f in c["prompts"].list())
    listed = [p for name in domains for p in image[name]] + list(prompts)
    if len(set(listed)) != len(listed) or set(listed) != set(files):
        extra = sorted(set(files) ^ set(listed)) or [p for p in listed if listed.count(p) > 1]
        raise Damaged(f"fedclip.files and the subsets' file lists disagree (on {extra[0]})")
    for name in domains:
        rows = sum(files[p].rows for p in image[name])
        if rows != records[f"/domains/{name}/ids"].shape[0]:
            raise Damaged(f"the files of domain {name} hold {rows} rows, fedclip.cache.datasets says "
                          f"{records[f'/domains/{name}/ids'].shape[0]}")
    text_rows = int(np.prod(records[TEXT].shape[:2]))
    if sum(files[p].rows for p in prompts) != text_rows:
        raise Damaged(f"the prompt files hold {sum(files[p].rows for p in prompts)} rows, {TEXT} has {text_rows}")
    return Manifest(identity, groups, records, domains, classes, dim, image, prompts, files)


def _check_shapes(records: dict, domains, classes: int, dim: int) -> None:
    """Each dataset's dtype and shape agree with the root attributes and with each other."""
    def want(path: str, kinds, shape: tuple):
        r = records[path]
        if r.dtype not in kinds:
            raise Damaged(f"fedclip.cache.datasets[{path!r}].dtype is {r.dtype!r}, not one of {', '.join(kinds)}")
        if len(r.shape) != len(shape) or any(w is not None and g != w for g, w in zip(r.shape, shape)):
            shown = "[" + ", ".join("N" if w is None else str(w) for w in shape) + "]"
            raise Damaged(f"fedclip.cache.datasets[{path!r}].shape is {list(r.shape)}, not {shown}")
        return r.shape

    want(TEXT, EMBEDDING_DTYPES, (None, classes, dim))
    want(SCALE, EMBEDDING_DTYPES, ())
    if records[SCALE].values is None or len(records[SCALE].values) != 1 or \
            isinstance(records[SCALE].values[0], bool) or not isinstance(records[SCALE].values[0], (int, float)):
        raise Damaged(f"fedclip.cache.datasets[{SCALE!r}].values is not [the logit scale]")
    for name in domains:
        emb, labels, ids = dataset_paths(name)
        n = want(ids, ("str",), (None,))[0]
        want(labels, LABEL_DTYPES, (n,))
        want(emb, EMBEDDING_DTYPES, (n, dim))
        sids, reasons = (f"/domains/{name}/{k}" for k in SKIPPED)
        if (sids in records) != (reasons in records):
            raise Damaged(f"fedclip.cache.datasets lists only one of {sids} and {reasons}")
        if sids in records:
            s = want(sids, ("str",), (None,))[0]
            want(reasons, ("str",), (s,))
            for p in (sids, reasons):
                if records[p].values is None or len(records[p].values) != records[p].shape[0]:
                    raise Damaged(f"fedclip.cache.datasets[{p!r}].values does not hold its {records[p].shape[0]} "
                                  "strings")
    emb_dtypes = {records[f"/domains/{name}/image_embeddings"].dtype for name in domains}
    if len(emb_dtypes) > 1:
        raise Damaged(f"the domains' embeddings have different dtypes ({', '.join(sorted(emb_dtypes))})")
