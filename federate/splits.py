"""Per-domain 60/20/20 train/validation/test splits, as in the reference code.

The permutation comes from the run's seed hashed with the domain name (DomainBed's habit), so a split is
reproducible per (seed, domain) whatever other domains take part. Splits are saved as sample ids
(splits.json) and can be read back with split_file= to reuse a published split.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from .errors import ConfigError

PARTS = ("train", "val", "test")


def split_indices(n: int, seed: int, domain: str) -> dict[str, np.ndarray]:
    """Shuffle 0..n-1 and cut int(0.6 n), int(0.2 n), int(0.2 n) (a remainder of 0-2 rows is unused)."""
    perm = np.random.default_rng([seed, zlib.crc32(domain.encode())]).permutation(n)
    n_train, n_val = int(0.6 * n), int(0.2 * n)
    return {"train": perm[:n_train], "val": perm[n_train:n_train + n_val],
            "test": perm[n_train + n_val:n_train + 2 * n_val]}


def splits_to_ids(splits: dict[str, dict[str, np.ndarray]], ids_of: dict[str, tuple[str, ...]]) -> dict:
    return {d: {p: [ids_of[d][i] for i in parts[p]] for p in parts} for d, parts in splits.items()}


def read_split_file(path: str | Path, ids_of: dict[str, tuple[str, ...]], domains) -> dict[str, dict[str, np.ndarray]]:
    """Indices for the ids listed in a splits.json; every id must exist in the cache."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read split_file {path}: {e}") from None
    out = {}
    for d in domains:
        if d not in data:
            raise ConfigError(f"split_file {path} has no split for domain {d} (it has {', '.join(data)})")
        index = {s: i for i, s in enumerate(ids_of[d])}
        out[d] = {}
        for p in PARTS:
            unknown = [s for s in data[d].get(p, []) if s not in index]
            if unknown:
                raise ConfigError(f"split_file {path}: {len(unknown)} {d}/{p} ids are not in the cache, "
                                  f"e.g. {unknown[0]!r}")
            out[d][p] = np.array([index[s] for s in data[d].get(p, [])], dtype=np.int64)
    return out
