"""`python -m federate.partition <cache.h5> [partition=...] [seed=...] [key=value ...] [--out DIR]`: the
label distribution of the clients a partition makes (clients x classes), before any run.

The settings are federate's (conf/federate.yaml: partition, seed, split_file, dataset.classes,
target_domain). The clients of every domain of the cache are shown (a domain's partition does not depend
on which domain is the target), unless target_domain names a domain to leave out. Writes
label_distribution.csv (a row per client: its domain, its rows, then its count of each class) and
label_distribution.png (Flower Datasets' plot_label_distributions: stacked bars for a few clients and
classes, a heatmap otherwise) into --out (default outputs/partition/<time>), and logs a short table.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from extract.files import UnsafePath, atomic_path, open_atomic, own_folder

from ..cli import CONF_DIR, GROUPS, bad_value, unknown_choice, unknown_setting
from ..errors import ConfigError

log = logging.getLogger("federate.partition")

FILES = ("label_distribution.csv", "label_distribution.png")
BAR_LIMIT = (40, 20)  # up to 40 clients and 20 classes: stacked bars; beyond: a heatmap


def compose(cache_file: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ..experiment import check_settings

    message = (unknown_choice(overrides, GROUPS) or unknown_setting(overrides, "federate")
               or bad_value(overrides, "federate"))
    if message:
        raise ConfigError(message)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose("federate", [f"cache_file={cache_file}", *overrides])
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(" ".join(str(e).split())) from None
    check_settings(cfg)  # the seed's range, and every other setting as a run checks it
    return cfg


def label_counts(cache, clients) -> np.ndarray:
    """[clients, classes]: how many rows (train, val and test) of each class each client holds."""
    counts = np.zeros((len(clients), len(cache.class_names)), dtype=np.int64)
    for i, c in enumerate(clients):
        rows = np.concatenate([c.rows[p] for p in ("train", "val", "test")])
        counts[i] = np.bincount(cache.domains[c.domain].labels[rows], minlength=len(cache.class_names))
    return counts


def write_csv(path: Path, cache, clients, counts: np.ndarray) -> None:
    with open_atomic(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["client", "domain", "rows", *cache.class_names])
        for c, row in zip(clients, counts):
            out.writerow([c.name, c.domain, int(row.sum()), *row.tolist()])


def plot(path: Path, cache, clients, title: str) -> None:
    """Flower Datasets' plot_label_distributions over our clients (a partitioner that hands them out)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # a local plot: send nothing anywhere
    import datasets
    import matplotlib

    matplotlib.use("Agg")
    from flwr_datasets.partitioner import Partitioner
    from flwr_datasets.visualization import plot_label_distributions

    class Clients(Partitioner):
        """The clients' rows, already decided, as a Flower Datasets partitioner."""

        def __init__(self, parts: list[np.ndarray]):
            super().__init__()
            self.parts = parts

        def load_partition(self, partition_id: int) -> datasets.Dataset:
            return self.dataset.select(self.parts[partition_id])

        @property
        def num_partitions(self) -> int:
            return len(self.parts)

    labels, parts, start = [], [], 0
    for c in clients:
        rows = np.concatenate([c.rows[p] for p in ("train", "val", "test")])
        labels.append(cache.domains[c.domain].labels[rows])
        parts.append(np.arange(start, start + len(rows)))
        start += len(rows)
    features = datasets.Features({"label": datasets.ClassLabel(names=list(cache.class_names))})
    partitioner = Clients(parts)
    partitioner.dataset = datasets.Dataset.from_dict({"label": np.concatenate(labels)}, features=features)
    bars = len(clients) <= BAR_LIMIT[0] and len(cache.class_names) <= BAR_LIMIT[1]
    size = (min(24.0, 4 + 0.3 * len(clients)), min(16.0, 3 + (0.25 if bars else 0.05) * len(cache.class_names)))
    fig, ax, _ = plot_label_distributions(partitioner, "label", plot_type="bar" if bars else "heatmap",
                                          size_unit="absolute", partition_id_axis="x", figsize=size, title=title,
                                          legend=True, legend_title="class" if bars else "rows")
    if len(clients) <= 60:  # client names instead of partition numbers
        ax.set_xticks(np.arange(len(clients)) + (0 if bars else 0.5))
        ax.set_xticklabels([c.name for c in clients], rotation=90)
    ax.set_xlabel("client")
    with atomic_path(path) as tmp:  # (a link at `path` is replaced, never written through)
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")  # the legend sits outside the axes


def table(clients, counts: np.ndarray, class_names) -> str:
    """A few lines: per client its rows, its number of classes and its largest class's share."""
    lines = [f"{'client':24s} {'rows':>7s} {'classes':>7s}  largest class"]
    for c, row in zip(clients, counts):
        top = int(row.argmax())
        lines.append(f"{c.name:24s} {int(row.sum()):7d} {int((row > 0).sum()):7d}  {class_names[top]} "
                     f"({100 * row[top] / max(1, row.sum()):.0f}%)")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m federate.partition", description=__doc__.splitlines()[0])
    parser.add_argument("cache", help="an embedding cache (.h5) written by python -m extract")
    parser.add_argument("overrides", nargs="*", help="federate settings: partition=..., seed=..., ...")
    parser.add_argument("--out", help="folder for the CSV and the PNG (default outputs/partition/<time>)")
    args = parser.parse_args(argv)
    from ..cache import load_cache
    from ..cache import canonical_domain, case_hint
    from . import make_clients, restrict_classes

    cfg = compose(args.cache, args.overrides)
    cache = restrict_classes(load_cache(args.cache), cfg.dataset.get("classes"))
    target = canonical_domain(cfg.target_domain) if cfg.target_domain else None
    if target is not None and target not in cache.domains:
        raise ConfigError(f"target_domain {target!r} is not in {args.cache}; its domains: {', '.join(cache.domains)}"
                          f"{case_hint(target, cache.domains)}")
    domains = [d for d in cache.domains if d != target]
    clients = make_clients(cache, domains, cfg)
    out = Path(args.out or f"outputs/partition/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    own_folder(out)  # a link is refused
    taken = [out / f for f in FILES if os.path.lexists(out / f)]
    if taken:
        raise ConfigError(f"{taken[0]} exists; give --out a folder without label_distribution files")
    counts = label_counts(cache, clients)
    write_csv(out / FILES[0], cache, clients, counts)
    if cfg.split_file:
        how = f"split_file {Path(cfg.split_file).name}"
    else:
        how = f"partition={cfg.partition.name}\n" + " ".join(f"{k}={v}" for k, v in cfg.partition.items() if k != "name")
    title = f"{cache.dataset_name}: {how} seed={cfg.seed}"
    plot(out / FILES[1], cache, clients, title)
    log.info("%s\n%s", title, table(clients, counts, cache.class_names))
    log.info("wrote %s and %s", out / FILES[0], out / FILES[1])


def cli() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main(sys.argv[1:])
    except (ConfigError, UnsafePath) as e:
        log.error("[federate.partition][ERROR] - %s", " ".join(str(e).split()))
        sys.exit(2)
    except OSError as e:
        log.error("[federate.partition][ERROR] - %s: %s", e.filename or "", e.strerror or e)
        sys.exit(2)
