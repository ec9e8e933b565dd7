"""Clients: who trains on which rows of the cache (Hydra group `partition`).

A client is a named set of rows of one participating domain, split 60/20/20 into train/validation/test
as FedCLIP splits a domain. `partition=domain` (the default, the reference protocol) makes one client
per participating domain, named after it; other partitions split each domain into several clients named
`<domain>/<k>`. Row indices always point into the domain's rows in the cache, so a client's data is
`cache.domains[client.domain]` at `client.rows[part]`.

splits.json (written by every run, read back with `split_file=`) maps each client to its ids:
`{client: {"train": [id, ...], "val": [...], "test": [...]}}`; for `partition=domain` this is exactly the
per-domain file of earlier versions.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .cache import DomainData, EmbeddingCache
from .errors import ConfigError
from .splits import PARTS, read_split_file, split_indices


@dataclass(frozen=True)
class ClientSplit:
    name: str  # the domain itself for partition=domain, else "<domain>/<k>"
    domain: str
    rows: dict[str, np.ndarray]  # "train" | "val" | "test" -> row indices into the domain's rows in the cache


def make_clients(cache, participants: list[str], cfg) -> list[ClientSplit]:
    """The clients of the participating domains, from the partition settings and the seed, or replayed
    from a published splits.json (`split_file`)."""
    ids_of = {d: cache.domains[d].ids for d in participants}
    if cfg.split_file:
        splits = read_split_file(cfg.split_file, ids_of, participants)
    else:
        splits = {d: split_indices(len(ids_of[d]), int(cfg.seed), d) for d in participants}
    return [ClientSplit(d, d, splits[d]) for d in participants]


def splits_json(clients: list[ClientSplit], cache) -> dict:
    """What splits.json holds: each client's ids per part."""
    return {c.name: {p: [cache.domains[c.domain].ids[i] for i in c.rows[p]] for p in PARTS} for c in clients}


def restrict_classes(cache, classes) -> EmbeddingCache:
    """The cache seen through a subset of its classes (`dataset.classes=[...]` at federate time, e.g. the
    10-class DomainNet subset): only their rows, their prompts, labels renumbered in the order given.
    None (the default) keeps every class."""
    if classes is None:
        return cache
    classes = [str(c) for c in classes]
    unknown = [c for c in classes if c not in cache.class_names]
    if unknown or len(set(classes)) != len(classes) or len(classes) < 2:
        why = (f"{unknown[0]!r} is not a class of {cache.path} (its classes: {', '.join(cache.class_names)})"
               if unknown else "it must name at least 2 distinct classes")
        raise ConfigError(f"dataset.classes={classes}: {why}")
    old = np.array([cache.class_names.index(c) for c in classes])
    new_label = np.full(len(cache.class_names), -1, dtype=np.int64)
    new_label[old] = np.arange(len(classes))
    domains = {}
    for name, d in cache.domains.items():
        keep = np.flatnonzero(new_label[d.labels] >= 0)
        domains[name] = DomainData(d.features[keep], new_label[d.labels[keep]], tuple(d.ids[i] for i in keep))
    return replace(cache, class_names=tuple(classes), text=cache.text[:, old], domains=domains)
