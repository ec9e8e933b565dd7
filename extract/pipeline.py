"""`run(cfg)`: one pass of CLIP over every image and class prompt of a dataset, into the cache."""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import cache as cachefile
from .cache_checks import CacheFormatError, check_name
from .commands import extract_command
from .config import template_problem, value
from .errors import ExtractError, os_errors
from .images import to_rgb
from .model import (check_tokenizer, image_embeddings, load_clip, model_dtype, num_parameters, resolve_device,
                    resolve_model, text_embeddings)
from .sources import DomainImages, load_source

log = logging.getLogger(__name__)


class PreprocessedImages(Dataset):
    """Images start..end of a domain, opened and preprocessed by CLIP's processor (in DataLoader workers).

    Every image is converted to 8-bit RGB first (`images.to_rgb`: EXIF orientation, high bit depth scaled,
    transparency on white). A file that cannot be decoded yields its reason instead of pixels, so one bad
    file does not stop the run; the reason is recorded in the cache.
    """

    def __init__(self, domain: DomainImages, processor, start: int):
        self.domain, self.processor, self.start = domain, processor, start

    def __len__(self) -> int:
        return len(self.domain) - self.start

    def __getitem__(self, k: int):
        i = self.start + k
        try:
            with self.domain.open(i) as image:
                image.load()
                pixels = self.processor(images=to_rgb(image), return_tensors="pt")["pixel_values"][0]
            return i, pixels, None
        except Exception as e:  # any decoder error means "this file is unusable"
            return i, None, f"{type(e).__name__}: {e}"


def collate(items):
    good = [(i, p) for i, p, err in items if err is None]
    bad = [(i, err) for i, _, err in items if err is not None]
    pixels = torch.stack([p for _, p in good]) if good else None
    return [i for i, _ in good], pixels, bad, len(items)


def encode_domain(store: cachefile.PartialStore, k: int, domain: DomainImages, model, processor, cfg,
                  embed_dim: int) -> None:
    """Embed the images of domain k that the partial store does not hold yet, one committed batch at a time."""
    processed = store.processed(k)
    if processed >= len(domain):
        log.info("%s: already extracted", domain.name)
        return
    loader = DataLoader(PreprocessedImages(domain, processor, processed), batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers, collate_fn=collate,
                        pin_memory=model.device.type == "cuda")
    fail = value(cfg.on_bad_image) == "fail"
    with tqdm(total=len(domain), initial=processed, unit="img", desc=domain.name, dynamic_ncols=True) as bar:
        for rows, pixels, bad, n in loader:
            for i, reason in bad:
                if fail:
                    raise ExtractError(f"cannot read image {domain.ids[i]} of domain {domain.name}: {reason} "
                                       "(on_bad_image=skip skips such files)")
                log.warning("skipping unreadable image %s: %s", domain.ids[i], reason)
            embeddings = image_embeddings(model, pixels).numpy() if pixels is not None else None
            processed += n
            store.commit(k, processed, embeddings, [domain.ids[i] for i in rows], [domain.labels[i] for i in rows],
                         [(domain.ids[i], reason) for i, reason in bad], value(cfg.cache_dtype), embed_dim)
            bar.update(n)


def check_settings(cfg) -> None:
    """What the typed schema (extract/config.py) cannot say: ranges and template syntax."""
    if int(cfg.batch_size) < 1 or int(cfg.num_workers) < 0:
        raise ExtractError("batch_size must be >= 1 and num_workers >= 0")
    if not cfg.prompt_templates:
        raise ExtractError("prompt_templates must be a non-empty list of strings containing {}")
    if problem := next(filter(None, map(template_problem, cfg.prompt_templates)), None):
        raise ExtractError(problem)


def settings_of(source, model_ref, cfg, device: torch.device) -> dict:
    """The root attributes that say what the cache is (cache.SETTINGS), before the model is loaded."""
    return {
        "schema_version": cachefile.SCHEMA_VERSION,
        "model_fingerprint": model_ref.fingerprint,
        "dataset_name": source.name,
        "domains": json.dumps([d.name for d in source.domains]),
        "class_names": json.dumps(source.class_names),
        "prompt_names": json.dumps(source.prompt_names),
        "prompt_templates": json.dumps(list(cfg.prompt_templates)),
        "image_dtype": value(cfg.cache_dtype),
        "inputs_fingerprint": cachefile.inputs_fingerprint(source.domains),
        "model_dtype": str(model_dtype(device)).replace("torch.", ""),
    }


def check_existing(path: Path, settings: dict, overwrite: bool) -> bool:
    """True when `path` already is the cache these settings describe (nothing to do)."""
    if not path.exists():
        return False
    existing = cachefile.read_settings(path)
    if existing is None:
        raise ExtractError(f"{path} exists and is not a fedclip cache; fedclip does not overwrite it: move it away "
                           "or choose another cache_file")
    diffs = cachefile.differences(existing, settings)
    if overwrite:
        log.info("overwrite=true: rebuilding %s", path)
        return False
    if not existing.get("complete"):
        raise ExtractError(f"{path} is an incomplete fedclip cache; pass overwrite=true to rebuild it")
    if diffs:
        other = path.with_name(f"{path.stem}-2{path.suffix}")
        raise ExtractError(f"{path} is a complete cache built with other settings ({'; '.join(diffs)}); pass "
                           f"overwrite=true to rebuild it, or another cache_file to keep both (cache_file={other})")
    return True


def run(cfg) -> Path:
    """Extract the cache described by `cfg` (conf/extract.yaml); return its path."""
    start = time.time()
    check_settings(cfg)
    with os_errors(f"prepare dataset {cfg.dataset.name or cfg.dataset.root}"):
        local = extract_command(cfg, dataset__root=f"/path/to/{cfg.dataset.name or 'dataset'}")
        source = load_source(cfg.dataset, local)
    try:  # the name becomes a folder of the default cache path, and federate refuses a cache without a plain one
        check_name("dataset name", source.name)
    except CacheFormatError as e:
        plain = Path(str(source.name)).name.strip(".") or "dataset"
        raise ExtractError(f"the dataset {e}; pass a plain name, e.g. dataset.name={plain}") from None
    model_ref = resolve_model(cfg.model, cfg.cache_dir)
    path = Path(cfg.cache_file) if cfg.cache_file else cachefile.default_cache_path(
        cfg.cache_dir, source.name, model_ref.name)
    device = resolve_device(value(cfg.device))
    settings = settings_of(source, model_ref, cfg, device)
    with cachefile.exclusive_lock(path):
        if check_existing(path, settings, bool(cfg.overwrite)):
            log.info("%s is complete already, with these settings and model: nothing to do (overwrite=true "
                     "rebuilds it)", path)
            return path
        store = cachefile.PartialStore.open(path, settings, len(source.domains), bool(cfg.overwrite))
        model, processor, tokenizer = load_clip(model_ref, device)
        templates = list(cfg.prompt_templates)
        prompts = [t.format(c) for t in templates for c in source.prompt_names]
        check_tokenizer(tokenizer, prompts, model_ref.directory)
        text = text_embeddings(model, tokenizer, prompts)
        embed_dim = text.shape[-1]
        import transformers

        header = dict(
            settings,
            model_name=model_ref.name,
            embed_dim=embed_dim,
            model_num_parameters=num_parameters(model),
            model_revision=model_ref.revision,
            model_source=model_ref.source,
            model_path=str(model_ref.directory) if model_ref.source == "local" else "",
            preprocessing=json.dumps(processor.to_dict(), default=str),
            source=json.dumps(source.provenance),
            versions=json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                                 "h5py": h5py.__version__, "numpy": np.__version__}),
            device=device.type,
        )
        try:
            for k, domain in enumerate(source.domains):
                encode_domain(store, k, domain, model, processor, cfg, embed_dim)
        except KeyboardInterrupt:  # the entry point says it in one line
            raise KeyboardInterrupt(f"{store.dir} keeps what was done; re-run the same command to resume") from None
        header["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        counts = store.assemble(header, text.numpy().reshape(len(templates), len(source.class_names), embed_dim),
                                float(model.logit_scale.detach().exp()), source.domains, embed_dim,
                                value(cfg.cache_dtype))
    for name, (n, s) in counts.items():
        if n == 0:
            log.warning("domain %s has no images (%d skipped: python -m extract.info %s lists why); federate refuses "
                        "to load it", name, s, path)
    total = sum(n for n, _ in counts.values())
    skipped = sum(s for _, s in counts.values())
    log.info("wrote %s: %d images (%s), %d skipped, %d classes, dim %d, %.1f s", path, total,
             ", ".join(f"{d} {n}" for d, (n, _) in counts.items()), skipped, len(source.class_names),
             embed_dim, time.time() - start)
    return path
