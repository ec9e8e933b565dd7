"""60/20/20 train/validation/test splits of a client's rows, as the reference code splits a domain.

The permutation comes from the run's seed hashed with the client's name (a domain's name when the domain is
one client: DomainBed's habit), so a split is reproducible per (seed, client) whatever other clients take
part. Splits are saved as sample ids (splits.json, {client: {part: [id, ...]}}) and can be read back with
split_file= to reuse a published split. A split that would give meaningless numbers (overlapping or
repeated ids, fewer than 2 training rows, an empty val or test split) is refused with a ConfigError.
"""
from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from .cache import canonical_domain
from .errors import ConfigError
from .inputs import MiB, Unreadable, read_json

PARTS = ("train", "val", "test")
MIN_TRAIN = 2  # the in-batch contrastive loss needs pairs
MIN_ROWS = 5  # the fewest rows whose seeded 60/20/20 split has 2 training rows and non-empty val and test
MAX_SPLIT_BYTES = 512 * MiB  # DomainNet's 586,000 ids take about 30 MB


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


def client_domain(name: str, domains) -> str | None:
    """The domain of a client named in a splits.json: the name itself for a domain's only client
    (partition=domain), else the part before the last "/<k>" ("photo/3" -> "photo"); None if neither."""
    if name in domains:
        return name
    head, sep, k = name.rpartition("/")
    return head if sep and k.isdigit() and head in domains else None


def read_client_splits(path: str | Path, ids_of: dict[str, tuple[str, ...]], participants,
                       all_domains=None, left_out=None) -> dict[str, tuple[str, dict[str, np.ndarray]]]:
    """client -> (its domain, indices per part into the domain's rows) for the clients of the participating
    domains listed in a splits.json ({client: {"train": [id, ...], "val": [...], "test": [...]}}).

    A client is named after its domain (one client per domain) or "<domain>/<k>". Every participating
    domain must have at least one client; each client lists its three parts, each a list of distinct ids
    of its domain in the cache, no id in two parts or two clients of a domain, at least 2 train ids and
    non-empty val and test. Clients of a domain that does not take part (the target) are skipped; a name
    that is no client of a domain of the cache (`all_domains`, default the participants) is refused, and
    so are two names that are one client once normalised ("a b" and "a_b"). `left_out`: {domain: ids} of
    rows the run does not use (classes outside dataset.classes), dropped from the split instead of refused.

    Only a regular file of at most MAX_SPLIT_BYTES is read (a FIFO or /dev/zero is refused)."""
    try:
        data = read_json(path, MAX_SPLIT_BYTES)
    except Unreadable as e:
        raise ConfigError(f"cannot read split_file {path}: {e}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read split_file {path}: {e}") from None
    shape = 'a JSON object {client: {"train": [ids], "val": [ids], "test": [ids]}}'
    if not isinstance(data, dict):
        raise ConfigError(f"split_file {path} must be {shape}, not a JSON {type_name(data)}")
    known = [canonical_domain(d) for d in (all_domains or participants)]
    domain_of, written = {}, {}
    for name in data:
        head, sep, k = name.rpartition("/")  # "Real World/2" is "Real_World/2"
        canonical = f"{canonical_domain(head)}/{k}" if sep and k.isdigit() else canonical_domain(name)
        domain = client_domain(canonical, known)
        if domain is None:
            raise ConfigError(f"split_file {path}: {name!r} is not a client of a domain of the cache: a client is "
                              f"named after its domain ({', '.join(known)}) or <domain>/<k>")
        if canonical in domain_of:
            raise ConfigError(f"split_file {path}: {written[canonical]!r} and {name!r} are one client, {canonical!r} "
                              "(runs of whitespace in a name read as _); list each client once")
        domain_of[canonical], written[canonical] = domain, name
    data = {c: parts for c, parts in zip(domain_of, data.values())}
    out, owner = {}, {}
    for d in participants:
        clients = [c for c in data if domain_of[c] == d]
        if not clients:
            raise ConfigError(f"split_file {path} has no split for domain {d} (it has {', '.join(data) or 'none'})")
        index = {s: i for i, s in enumerate(ids_of[d])}
        owner.clear()  # id -> (client, part) within the domain
        for c in clients:
            out[c] = (d, _read_parts(path, c, d, data[c], index, owner, (left_out or {}).get(d, ())))
    return out


def _read_parts(path, client: str, domain: str, parts, index: dict[str, int], owner: dict,
                left_out=()) -> dict[str, np.ndarray]:
    """One client's indices per part; `owner` holds the ids already taken in the domain (id -> (client, part));
    ids in `left_out` (rows the run does not use) are dropped."""
    who = f"domain {client}" if client == domain else f"client {client}"
    if not isinstance(parts, dict):
        raise ConfigError(f"split_file {path}: {who} must map to {{\"train\": [ids], \"val\": [ids], "
                          f"\"test\": [ids]}}, not a JSON {type_name(parts)}")
    extra = [p for p in parts if p not in PARTS]
    if extra:
        raise ConfigError(f"split_file {path}: {who} has the unknown part(s) {', '.join(map(repr, extra))}; "
                          f"the parts are {', '.join(PARTS)}")
    missing = [p for p in PARTS if p not in parts]
    if missing:
        sizes = ", ".join(f"{p} {len(parts[p]) if isinstance(parts.get(p), list) else 0}" for p in PARTS)
        raise ConfigError(f"split_file {path}: {who} has no {' and no '.join(missing)} part ({sizes}); "
                          f"list train, val and test ids for every participating client, as the splits.json "
                          f"of an earlier run does (a missing val or test split would read as 0.00% accuracy)")
    out = {}
    for p in PARTS:
        ids = parts[p]
        if not isinstance(ids, list):
            raise ConfigError(f"split_file {path}: {who}, part {p} must be a list of id strings, "
                              f"not a JSON {type_name(ids)}")
        bad = [s for s in ids if not isinstance(s, str)]
        if bad:
            raise ConfigError(f"split_file {path}: {who}, part {p} must list id strings, but has "
                              f"{json.dumps(bad[0])} (a JSON {type_name(bad[0])})")
        counts = Counter(ids)
        repeated = [s for s, c in counts.items() if c > 1]
        if repeated:
            raise ConfigError(f"split_file {path}: {who}, part {p} repeats {len(repeated)} id(s), "
                              f"e.g. {repeated[0]!r} ({counts[repeated[0]]} times); list each id once")
        both = [s for s in ids if s in owner]
        if both:
            other, part = owner[both[0]]
            where = (f"parts {part} and {p} share" if other == client else
                     f"clients {other} ({part}) and {client} ({p}) of domain {domain} share")
            raise ConfigError(f"split_file {path}: {who}, {where} {len(both)} id(s), e.g. {both[0]!r}; an id "
                              f"belongs to one part of one client only")
        unknown = [s for s in ids if s not in index and s not in left_out]
        if unknown:
            raise ConfigError(f"split_file {path}: {who}, part {p}: {len(unknown)} ids are not ids of "
                              f"domain {domain} in the cache, e.g. {unknown[0]!r}")
        owner.update((s, (client, p)) for s in ids)
        out[p] = np.array([index[s] for s in ids if s in index], dtype=np.int64)
    check_split_sizes(client, {p: len(out[p]) for p in PARTS}, split_file=path)
    return out


def read_split_file(path: str | Path, ids_of: dict[str, tuple[str, ...]], domains) -> dict[str, dict[str, np.ndarray]]:
    """Indices per part of each participating domain's only client (the runners that keep one client per
    domain: the Flower apps and the image backbone); a domain split into several clients is refused."""
    clients = read_client_splits(path, ids_of, domains)
    split = sorted(c for c in clients if c not in domains)
    if split:
        raise ConfigError(f"split_file {path} splits domain {clients[split[0]][0]} into clients ({', '.join(split[:3])}"
                          f"{', ...' if len(split) > 3 else ''}); this runner keeps one client per domain: use "
                          f"backend=local, or a splits.json of a partition=domain run")
    return {d: clients[d][1] for d in domains}


def type_name(value) -> str:
    """The JSON name of a parsed value's type."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
