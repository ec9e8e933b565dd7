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

from dataclasses import dataclass

import numpy as np

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
