"""The images of a run, exactly those the cached methods see: the same source as `extract`
(`extract.sources.load_source`: the hub or `dataset.root`), the same ids, the same 60/20/20 splits
(`federate.splits`), opened and preprocessed by extract's `PreprocessedImages` in DataLoader workers.

Ids: extract skips a file it cannot decode (`on_bad_image=skip`, the default) and the cache lacks it, so
a seeded split of the cache is a split of the decodable images. `probe` decodes every image once at the
start and drops the unreadable ones (with a warning naming them), so a run on the images splits the
same ids as a cached run with the same seed and writes an identical splits.json.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from ..splits import read_split_file, split_indices

log = logging.getLogger("federate")


def load_images(dataset_cfg, method: str):
    """extract's Source for the dataset config, or a one-line ConfigError (no folder, no hub access)."""
    from extract.errors import ExtractError
    from extract.sources import load_source

    try:
        return load_source(dataset_cfg)
    except ExtractError as e:
        raise ConfigError(f"method={method} trains on the images, which are unavailable: {e} "
                          f"(python -m federate method={method} dataset.root=DIR)") from None


class Images(Dataset):
    """Every domain's PreprocessedImages behind one index (domain number, image number), so one
    DataLoader (one set of persistent workers) serves training and evaluation of all domains.

    A training key (domain, image, seed) asks for the processor's training transform with its random
    draws seeded (`processor.augmented(seed)`, AlexNet's flips and rotations); processors without one
    (CLIP's) ignore the seed."""

    def __init__(self, domains, processor):
        from extract.pipeline import PreprocessedImages

        self.parts = [PreprocessedImages(d, processor, 0) for d in domains]
        self.augmented = getattr(processor, "augmented", None)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, key):
        d, i, *seed = key
        part = self.parts[d]
        if seed and self.augmented is not None:
            part = type(part)(part.domain, self.augmented(seed[0]), 0)
        _, pixels, error = part[i]
        return (d, i), pixels, error


class Batches:
    """A batch sampler whose batches are set before each pass (persistent workers keep running)."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class Loader:
    """Batches of (pixels on the device, labels on the device) for any list of (domain, image) keys, or
    (domain, image, augmentation seed) training keys."""
    images: Images
    labels: list[np.ndarray]
    ids: list[list[str]]
    names: list[str]
    device: torch.device
    num_workers: int

    def __post_init__(self):
        from extract.pipeline import collate

        self.sampler = Batches()
        cuda = self.device.type == "cuda"
        self.loader = DataLoader(self.images, batch_sampler=self.sampler, collate_fn=collate,
                                 num_workers=self.num_workers, pin_memory=cuda,
                                 persistent_workers=self.num_workers > 0,
                                 prefetch_factor=4 if self.num_workers > 0 else None)

    def batches(self, batches: list[list[tuple[int, int]]]):
        self.sampler.batches = batches
        for keys, pixels, bad, _ in self.loader:
            if bad:
                (d, i), reason = bad[0]
                raise ConfigError(f"cannot read image {self.ids[d][i]} of domain {self.names[d]}: {reason}")
            labels = torch.tensor([int(self.labels[d][i]) for d, i in keys])
            yield (pixels.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))


def probe(domains, processor, num_workers: int) -> list:
    """The domains without the images that cannot be decoded (warned about, by id), as extract skips them."""
    from extract.pipeline import collate
    from extract.sources import DomainImages

    images = Images(domains, processor)
    keys = [(d, i) for d, dom in enumerate(domains) for i in range(len(dom))]
    loader = DataLoader(images, batch_sampler=[keys[s:s + 64] for s in range(0, len(keys), 64)],
                        collate_fn=collate, num_workers=num_workers)
    bad = {}
    for _, _, errors, _ in loader:
        for (d, i), reason in errors:
            bad.setdefault(d, set()).add(i)
            log.warning("skipping unreadable image %s of %s: %s", domains[d].ids[i], domains[d].name, reason)
    out = []
    for d, dom in enumerate(domains):
        if d not in bad:
            out.append(dom)
            continue
        keep = [i for i in range(len(dom)) if i not in bad[d]]
        ids = [dom.ids[i] for i in keep]
        opener = dom.opener
        if hasattr(opener, "rows"):  # hub: the table rows of the kept images
            opener = type(opener)(opener.table, [opener.rows[i] for i in keep])
        else:  # folder: opens by path (an id escapes the bytes of a name that is not UTF-8)
            opener = type(opener)(opener.root, [opener.paths[i] for i in keep])
        out.append(DomainImages(dom.name, ids, [dom.labels[i] for i in keep], opener))
    return out


def domain_splits(domains: dict, participants: list[str], seed: int, split_file: str | None) -> dict:
    """Indices of train/val/test per participant: the cached methods' rule (federate.splits)."""
    ids_of = {d: tuple(domains[d].ids) for d in participants}
    if split_file:
        splits = read_split_file(split_file, ids_of, participants)
    else:
        splits = {d: split_indices(len(ids_of[d]), seed, d) for d in participants}
    for d, parts in splits.items():
        sizes = {p: len(v) for p, v in parts.items()}
        if sizes["train"] < 2 or not sizes["val"] or not sizes["test"]:
            raise ConfigError(f"domain {d} has {sizes['train']} training, {sizes['val']} validation and "
                              f"{sizes['test']} test images; it needs at least 2 training images and some of each")
    return splits


def default_workers(setting, device: torch.device) -> int:
    """`backbone.num_workers`: an int, or auto (CUDA: up to 8 decoding workers; CPU: 1, as extract)."""
    if setting not in (None, "auto"):
        try:
            n = int(setting)
        except (TypeError, ValueError):
            n = -1
        if n < 0:
            raise ConfigError(f"backbone.num_workers must be auto or an integer >= 0, not {setting!r}")
        return n
    if device.type == "cuda":
        return max(1, min(8, (os.cpu_count() or 2) - 1))
    return 1
