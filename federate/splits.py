"""Per-domain 60/20/20 train/validation/test splits, as in the reference code.

The permutation comes from the run's seed hashed with the domain name (DomainBed's habit), so a split is
reproducible per (seed, domain) whatever other domains take part. Splits are saved as sample ids
(splits.json) and can be read back with split_file= to reuse a published split. A split that would give
meaningless numbers (overlapping or repeated ids, fewer than 2 training rows, an empty val or test split)
is refused with a ConfigError.
"""
from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from .cache import canonical_domain
from .errors import ConfigError

PARTS = ("train", "val", "test")
MIN_TRAIN = 2  # the in-batch contrastive loss needs pairs
MIN_ROWS = 5  # the fewest rows whose seeded 60/20/20 split has 2 training rows and non-empty val and test


def split_indices(n: int, seed: int, domain: str) -> dict[str, np.ndarray]:
    """Shuffle 0..n-1 and cut int(0.6 n), int(0.2 n), int(0.2 n) (a remainder of 0-2 rows is unused)."""
    perm = np.random.default_rng([seed, zlib.crc32(domain.encode())]).permutation(n)
    n_train, n_val = int(0.6 * n), int(0.2 * n)
    return {"train": perm[:n_train], "val": perm[n_train:n_train + n_val],
            "test": perm[n_train + n_val:n_train + 2 * n_val]}


def splits_to_ids(splits: dict[str, dict[str, np.ndarray]], ids_of: dict[str, tuple[str, ...]]) -> dict:
    return {d: {p: [ids_of[d][i] for i in parts[p]] for p in parts} for d, parts in splits.items()}


def check_split_sizes(domain: str, sizes: dict[str, int], *, split_file: str | Path | None = None) -> None:
    """Refuse a participant's split that cannot give meaningful numbers: fewer than 2 training rows (the
    contrastive loss needs pairs), or an empty val split (model selection would compare 0.00% accuracies)
    or test split (the reported accuracy would be 0.00%). `sizes`: part -> number of rows."""
    n = {p: int(sizes.get(p, 0)) for p in PARTS}
    empty = [p for p in ("val", "test") if n[p] == 0]
    problems = [f"{n['train']} training row{'' if n['train'] == 1 else 's'}"] if n["train"] < MIN_TRAIN else []
    problems += [f"an empty {p} split" for p in empty]
    if not problems:
        return
    reasons = [f"training needs at least {MIN_TRAIN} rows"] if n["train"] < MIN_TRAIN else []
    if empty:
        reasons.append(f"an empty {' or '.join(empty)} split reads as 0.00% accuracy")
    counts = ", ".join(f"{p} {n[p]}" for p in PARTS)
    if split_file:
        fix = f"list at least {MIN_TRAIN} train ids and some val and test ids for {domain} in {split_file}"
    else:
        fix = (f"use a larger domain (the seeded 60/20/20 split needs at least {MIN_ROWS} rows), "
               f"or a split_file that lists train, val and test ids for it")
    raise ConfigError(f"{'split_file ' + str(split_file) + ': ' if split_file else ''}domain {domain} has "
                      f"{join_and(problems)} ({counts}): {' and '.join(reasons)}; {fix}")


def read_split_file(path: str | Path, ids_of: dict[str, tuple[str, ...]], domains) -> dict[str, dict[str, np.ndarray]]:
    """Indices for the ids listed in a splits.json ({domain: {"train": [id, ...], "val": [...], "test": [...]}}).

    Every participating domain must be listed with its three parts, each a list of distinct ids of that
    domain in the cache, no id in two parts, at least 2 train ids and non-empty val and test."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read split_file {path}: {e}") from None
    shape = 'a JSON object {domain: {"train": [ids], "val": [ids], "test": [ids]}}'
    if not isinstance(data, dict):
        raise ConfigError(f"split_file {path} must be {shape}, not a JSON {type_name(data)}")
    data = {canonical_domain(d): parts for d, parts in data.items()}  # "Real World" is "Real_World"
    out = {}
    for d in domains:
        if d not in data:
            raise ConfigError(f"split_file {path} has no split for domain {d} (it has {', '.join(data) or 'none'})")
        parts = data[d]
        if not isinstance(parts, dict):
            raise ConfigError(f"split_file {path}: domain {d} must map to {{\"train\": [ids], \"val\": [ids], "
                              f"\"test\": [ids]}}, not a JSON {type_name(parts)}")
        extra = [p for p in parts if p not in PARTS]
        if extra:
            raise ConfigError(f"split_file {path}: domain {d} has the unknown part(s) {', '.join(map(repr, extra))}; "
                              f"the parts are {', '.join(PARTS)}")
        missing = [p for p in PARTS if p not in parts]
        if missing:
            sizes = ", ".join(f"{p} {len(parts[p]) if isinstance(parts.get(p), list) else 0}" for p in PARTS)
            raise ConfigError(f"split_file {path}: domain {d} has no {' and no '.join(missing)} part ({sizes}); "
                              f"list train, val and test ids for every participating domain, as the splits.json "
                              f"of an earlier run does (a missing val or test split would read as 0.00% accuracy)")
        index = {s: i for i, s in enumerate(ids_of[d])}
        seen: dict[str, str] = {}
        out[d] = {}
        for p in PARTS:
            ids = parts[p]
            if not isinstance(ids, list):
                raise ConfigError(f"split_file {path}: domain {d}, part {p} must be a list of id strings, "
                                  f"not a JSON {type_name(ids)}")
            bad = [s for s in ids if not isinstance(s, str)]
            if bad:
                raise ConfigError(f"split_file {path}: domain {d}, part {p} must list id strings, but has "
                                  f"{json.dumps(bad[0])} (a JSON {type_name(bad[0])})")
            counts = Counter(ids)
            repeated = [s for s, c in counts.items() if c > 1]
            if repeated:
                raise ConfigError(f"split_file {path}: domain {d}, part {p} repeats {len(repeated)} id(s), "
                                  f"e.g. {repeated[0]!r} ({counts[repeated[0]]} times); list each id once")
            both = [s for s in ids if s in seen]
            if both:
                raise ConfigError(f"split_file {path}: domain {d}, parts {seen[both[0]]} and {p} share "
                                  f"{len(both)} id(s), e.g. {both[0]!r}; an id belongs to one part only")
            unknown = [s for s in ids if s not in index]
            if unknown:
                raise ConfigError(f"split_file {path}: domain {d}, part {p}: {len(unknown)} ids are not ids of "
                                  f"domain {d} in the cache, e.g. {unknown[0]!r}")
            seen.update((s, p) for s in ids)
            out[d][p] = np.array([index[s] for s in ids], dtype=np.int64)
        check_split_sizes(d, {p: len(out[d][p]) for p in PARTS}, split_file=path)
    return out


def type_name(value) -> str:
    """The JSON name of a parsed value's type."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
