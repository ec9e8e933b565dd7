"""Clients: who trains on which rows of the cache (Hydra group `partition`, docs/partitions.md).

A client is a named set of rows of one participating domain, split 60/20/20 into train/validation/test
as FedCLIP splits a domain (seeded with the run's seed and the client's name). `partition=domain` (the
default, the reference protocol) makes one client per participating domain, named after it; the other
partitions split each domain's rows into `partition.clients_per_domain` clients named `<domain>/<k>`,
with Flower Datasets' partitioners (imported only then):
- `iid`: a seeded shuffle cut into equal parts (`IidPartitioner` on the shuffled rows);
- `dirichlet`: label skew, each class's rows shared out by Dirichlet(alpha) proportions
  (`DirichletPartitioner`, redrawn until every client has `partition.min_rows` rows);
- `shards`: pathological skew, `partition.classes_per_client` classes per client (`PathologicalPartitioner`,
  first-deterministic: client k gets class k mod C and K-1 other classes drawn at random).
A domain's partition is seeded by the run's seed and the domain's name only, so it is the same whichever
domain is the target. Row indices always point into the domain's rows in the cache, so a client's data is
`cache.domains[client.domain]` at `client.rows[part]`.

splits.json (written by every run, read back with `split_file=`) maps each client to its ids:
`{client: {"train": [id, ...], "val": [...], "test": [...]}}`; for `partition=domain` this is exactly the
per-domain file of earlier versions.

    python -m federate.partition <cache.h5> [partition=...] [seed=...] [--out DIR]

plots the clients' label distributions (federate/partition/plot.py).
"""
from __future__ import annotations

import logging
import math
import os
import warnings
import zlib
from dataclasses import dataclass, replace

import numpy as np

from ..cache import DomainData, EmbeddingCache, derived
from ..errors import ConfigError
from ..splits import MIN_ROWS, PARTS, read_client_splits, split_indices

log = logging.getLogger("federate")

PARTITIONS = ("domain", "iid", "dirichlet", "shards")


@dataclass(frozen=True)
class ClientSplit:
    name: str  # the domain itself for partition=domain, else "<domain>/<k>"
    domain: str
    rows: dict[str, np.ndarray]  # "train" | "val" | "test" -> row indices into the domain's rows in the cache


@dataclass(frozen=True)
class PartitionSettings:
    """The validated `partition` settings (conf/partition/*.yaml)."""
    name: str = "domain"
    clients_per_domain: int = 1
    alpha: float = math.inf  # dirichlet only
    min_rows: int = MIN_ROWS  # dirichlet only: Flower's min_partition_size
    classes_per_client: int = 0  # shards only

    @classmethod
    def from_config(cls, node, num_classes: int) -> "PartitionSettings":
        """Settings from the `partition` node, each checked in one line (types included: the group's keys
        differ per partition, so they are checked here rather than by the config schema)."""
        node = dict(node or {"name": "domain"})
        name = node.pop("name", "domain")
        if name not in PARTITIONS:
            raise ConfigError(f"partition must be one of {', '.join(PARTITIONS)}, not {name!r}")
        if name == "domain":
            return cls()
        n = _integer(node, "clients_per_domain")
        if n < 1:
            raise ConfigError(f"partition.clients_per_domain must be >= 1, not {n}")
        if name == "iid":
            return cls(name, n)
        if name == "dirichlet":
            alpha, min_rows = _number(node, "alpha"), _integer(node, "min_rows")
            if not (math.isfinite(alpha) and alpha > 0):
                raise ConfigError(f"partition.alpha must be > 0 and finite (small: strong label skew, large: close "
                                  f"to iid), not {alpha}")
            if min_rows < MIN_ROWS:
                raise ConfigError(f"partition.min_rows must be >= {MIN_ROWS} (the fewest rows whose 60/20/20 split "
                                  f"has 2 training rows and non-empty val and test), not {min_rows}")
            return cls(name, n, alpha=alpha, min_rows=min_rows)
        k = _integer(node, "classes_per_client")
        if not 1 <= k <= num_classes:
            raise ConfigError(f"partition.classes_per_client must be in 1..{num_classes} (the classes of the "
                              f"cache), not {k}")
        return cls(name, n, classes_per_client=k)

    def client_names(self, domain: str) -> list[str]:
        return [domain] if self.name == "domain" else [f"{domain}/{k}" for k in range(self.clients_per_domain)]


def _integer(node: dict, key: str) -> int:
    value = node.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"partition.{key} must be an integer, not {value!r}")
    return value


def _number(node: dict, key: str) -> float:
    value = node.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"partition.{key} must be a number, not {value!r}")
    return float(value)


def partition_seed(seed: int, domain: str) -> int:
    """The seed of a domain's partition: the run's seed hashed with the domain (32 bits, as the
    partitioners and `datasets` take them)."""
    return zlib.crc32(f"{seed}/{domain}".encode())


def make_clients(cache, participants: list[str], cfg) -> list[ClientSplit]:
    """The clients of the participating domains, from the partition settings and the seed, or replayed
    from a published splits.json (`split_file`: its clients, whatever the partition settings)."""
    ids_of = {d: cache.domains[d].ids for d in participants}
    if cfg.split_file:
        read = read_client_splits(cfg.split_file, ids_of, participants, cache.all_domains, cache.left_out)
        return [ClientSplit(name, d, rows) for name, (d, rows) in read.items()]
    settings = PartitionSettings.from_config(cfg.get("partition"), len(cache.class_names))
    seed = int(cfg.seed)
    if settings.name == "domain":
        return [ClientSplit(d, d, split_indices(len(ids_of[d]), seed, d)) for d in participants]
    for d in participants:  # every domain first: a bad setting fails before any partitioning
        check_domain_size(d, len(ids_of[d]), settings)
    clients = []
    for d in participants:
        names = settings.client_names(d)
        for name, rows in zip(names, partition_rows(cache.domains[d].labels, settings, seed, d)):
            rows = np.sort(rows)
            if len(rows) < MIN_ROWS:
                raise ConfigError(f"partition={settings.name} gives client {name} {len(rows)} row(s), fewer than the "
                                  f"{MIN_ROWS} its 60/20/20 split needs; lower partition.clients_per_domain (now "
                                  f"{settings.clients_per_domain}){_more_classes_hint(settings)}")
            clients.append(ClientSplit(name, d, {p: rows[i] for p, i in split_indices(len(rows), seed, name).items()}))
    return clients


def _more_classes_hint(settings: PartitionSettings) -> str:
    return " or raise partition.classes_per_client" if settings.name == "shards" else ""


def check_domain_size(domain: str, n: int, settings: PartitionSettings) -> None:
    """Refuse a domain of n rows that cannot give each of its clients the rows it needs."""
    k = settings.clients_per_domain
    each = settings.min_rows if settings.name == "dirichlet" else MIN_ROWS
    if n < k * each:
        raise ConfigError(f"domain {domain} has {n} rows, too few for {k} clients of at least {each} rows each; "
                          f"lower partition.clients_per_domain{' or partition.min_rows' * (settings.name == 'dirichlet')}")


def partition_rows(labels: np.ndarray, settings: PartitionSettings, seed: int, domain: str) -> list[np.ndarray]:
    """The rows (indices into the domain's rows) of each of the domain's clients, by Flower Datasets'
    partitioners on a `datasets.Dataset` of the domain's row numbers and labels."""
    n, k = len(labels), settings.clients_per_domain
    check_domain_size(domain, n, settings)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # partitioning is local: send nothing anywhere
    try:
        import datasets
        from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner
    except ImportError as e:
        raise ConfigError(f"partition={settings.name} needs Flower Datasets ({e}): pip install "
                          f"'flwr-datasets>=0.6.1,<0.7'") from None

    table = datasets.Dataset.from_dict({"row": np.arange(n), "label": np.asarray(labels)})
    rng_seed = partition_seed(seed, domain)
    if settings.name == "iid":  # IidPartitioner cuts contiguous parts: shuffle first, as FederatedDataset does
        partitioner, table = IidPartitioner(k), table.shuffle(seed=rng_seed)
    elif settings.name == "dirichlet":
        partitioner = DirichletPartitioner(k, "label", settings.alpha, min_partition_size=settings.min_rows,
                                           self_balancing=False, shuffle=True, seed=rng_seed)
    else:
        present = len(np.unique(labels))
        if settings.classes_per_client > present:
            raise ConfigError(f"partition.classes_per_client={settings.classes_per_client} but domain {domain} has "
                              f"rows of {present} classes only; lower partition.classes_per_client")
        partitioner = PathologicalPartitioner(k, "label", settings.classes_per_client,
                                              class_assignment_mode="first-deterministic", shuffle=True, seed=rng_seed)
    partitioner.dataset = table
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rows = [np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64) for i in range(k)]
        except ValueError as e:
            raise ConfigError(f"partition={settings.name} cannot split domain {domain} ({n} rows) into {k} clients: "
                              f"{_first_sentence(e)}; {_fix(settings)}") from None
    redrawn = sum("min_partition_size" in str(w.message) for w in caught)
    if redrawn:
        log.info("partition of %s: %d Dirichlet draw(s) left a client with fewer than partition.min_rows=%d rows "
                 "and were redrawn", domain, redrawn, settings.min_rows)
    for w in caught:  # anything else Flower warns about (classes no client drew): worth a line, not a failure
        if "min_partition_size" not in str(w.message):
            log.info("partition of %s: %s", domain, _first_sentence(w.message))
    return rows


def _first_sentence(message) -> str:
    return str(message).split(". ")[0].strip().rstrip(".")


def _fix(settings: PartitionSettings) -> str:
    if settings.name == "dirichlet":
        return "raise partition.alpha, or lower partition.min_rows or partition.clients_per_domain"
    return "lower partition.clients_per_domain or partition.classes_per_client"


def check_flower(cfg) -> None:
    """Refuse, in one line, what the Flower apps would ignore: they train on every class."""
    if cfg.dataset.get("classes") is not None:
        raise ConfigError("backend=flower trains on every class of the dataset, so dataset.classes cannot name a "
                          "subset; use backend=local with a method on the cached embeddings")


def splits_json(clients: list[ClientSplit], cache) -> dict:
    """What splits.json holds: each client's ids per part."""
    return {c.name: {p: [cache.domains[c.domain].ids[i] for i in c.rows[p]] for p in PARTS} for c in clients}


def restrict_classes(cache, classes) -> EmbeddingCache:
    """The cache seen through a subset of its classes (`dataset.classes=[...]` at federate time, e.g. the
    10-class DomainNet subset): only their rows, their prompts, labels renumbered in the order given.
    None (the default) keeps every class. The points of a sweep share one restricted copy."""
    if classes is None:
        return cache
    classes = [str(c) for c in classes]
    return derived(_RESTRICTED, cache, tuple(classes), lambda: _restricted(cache, classes))


_RESTRICTED: dict = {}  # federate.cache.derived: a cache's class subsets


def _restricted(cache, classes: list[str]) -> EmbeddingCache:
    unknown = [c for c in classes if c not in cache.class_names]
    if unknown or len(set(classes)) != len(classes) or len(classes) < 2:
        why = (f"{unknown[0]!r} is not a class of {cache.path} (its classes: {', '.join(cache.class_names)})"
               if unknown else "it must name at least 2 distinct classes")
        raise ConfigError(f"dataset.classes={classes}: {why}")
    old = np.array([cache.class_names.index(c) for c in classes])
    new_label = np.full(len(cache.class_names), -1, dtype=np.int64)
    new_label[old] = np.arange(len(classes))
    keep = np.flatnonzero(new_label[cache.labels] >= 0)  # the kept rows, copied once into new pooled arrays
    features, labels = cache.features[keep], new_label[cache.labels[keep]]
    domains, start, left_out = {}, 0, {}
    for name, d in cache.domains.items():  # (in the pooled arrays' order)
        mine = np.flatnonzero(new_label[d.labels] >= 0)
        left_out[name] = frozenset(d.ids[i] for i in np.flatnonzero(new_label[d.labels] < 0))
        rows = slice(start, start + len(mine))
        domains[name] = DomainData(features[rows], labels[rows], tuple(d.ids[i] for i in mine), start)
        start += len(mine)
    return replace(cache, class_names=tuple(classes), text=cache.text[:, old], domains=domains, features=features,
                   labels=labels, left_out=left_out)

