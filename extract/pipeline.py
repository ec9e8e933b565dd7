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
from .errors import ExtractError
from .model import (image_embeddings, load_clip, model_revision, num_parameters, resolve_device,
                    text_embeddings)
from .sources import DomainImages, load_source

log = logging.getLogger(__name__)


class PreprocessedImages(Dataset):
    """Images start..end of a domain, opened and preprocessed by CLIP's processor (in DataLoader workers).

    A file that cannot be decoded yields its reason instead of pixels, so one bad file does not stop the run.
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
                pixels = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
            return i, pixels, None
        except Exception as e:  # any decoder error means "this file is unusable"
            return i, None, f"{type(e).__name__}: {e}"


def collate(items):
    good = [(i, p) for i, p, err in items if err is None]
    bad = [(i, err) for i, _, err in items if err is not None]
    pixels = torch.stack([p for _, p in good]) if good else None
    return [i for i, _ in good], pixels, bad, len(items)


def encode_domain(f: h5py.File, domain: DomainImages, model, processor, cfg, embed_dim: int) -> tuple[int, int]:
    writer = cachefile.DomainWriter(f, domain.name, len(domain), embed_dim, cfg.cache_dtype)
    if writer.done:
        log.info("%s: already in the cache", domain.name)
        return writer.g["ids"].shape[0], writer.g["skipped/ids"].shape[0]
    processed = writer.processed
    loader = DataLoader(PreprocessedImages(domain, processor, processed), batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers, collate_fn=collate,
                        pin_memory=model.device.type == "cuda")
    with tqdm(total=len(domain), initial=processed, unit="img", desc=domain.name, dynamic_ncols=True) as bar:
        for rows, pixels, bad, n in loader:
            for i, reason in bad:
                if cfg.on_bad_image == "fail":
                    raise ExtractError(f"cannot read image {domain.ids[i]} of domain {domain.name}: {reason} "
                                       "(on_bad_image=skip skips such files)")
                log.warning("skipping unreadable image %s: %s", domain.ids[i], reason)
            embeddings = image_embeddings(model, pixels).numpy() if pixels is not None else None
            processed += n
            writer.commit(embeddings, [domain.ids[i] for i in rows], [domain.labels[i] for i in rows],
                          [(domain.ids[i], reason) for i, reason in bad], processed)
            bar.update(n)
    writer.finish()
    return writer.g["ids"].shape[0], writer.g["skipped/ids"].shape[0]


def check_settings(cfg) -> None:
    if cfg.on_bad_image not in ("skip", "fail"):
        raise ExtractError(f"on_bad_image must be skip or fail, not {cfg.on_bad_image!r}")
    if cfg.cache_dtype not in ("float32", "float16"):
        raise ExtractError(f"cache_dtype must be float32 or float16, not {cfg.cache_dtype!r}")
    if int(cfg.batch_size) < 1 or int(cfg.num_workers) < 0:
        raise ExtractError("batch_size must be >= 1 and num_workers >= 0")
    if not cfg.prompt_templates or any("{}" not in t for t in cfg.prompt_templates):
        raise ExtractError("prompt_templates must be a non-empty list of strings containing {}")


def run(cfg) -> Path:
    """Extract the cache described by `cfg` (conf/extract.yaml); return its path."""
    start = time.time()
    check_settings(cfg)
    source = load_source(cfg.dataset)
    path = Path(cfg.cache_file) if cfg.cache_file else cachefile.default_cache_path(
        cfg.cache_dir, source.name, cfg.model.name)
    with cachefile.exclusive_lock(path):
        if path.exists() and not cfg.overwrite:
            if cachefile.is_complete(path):
                log.info("%s is complete already: nothing to do (overwrite=true rebuilds it)", path)
                return path
            raise ExtractError(f"{path} exists but is not a complete fedclip cache; move it away or pass "
                               "overwrite=true")
        if cfg.overwrite:
            cachefile.partial_path(path).unlink(missing_ok=True)
        device = resolve_device(cfg.device)
        model, processor, tokenizer = load_clip(cfg.model, cfg.cache_dir, device)
        templates = list(cfg.prompt_templates)
        prompts = [t.format(c) for t in templates for c in source.prompt_names]
        text = text_embeddings(model, tokenizer, prompts)
        embed_dim = text.shape[-1]
        import transformers

        header = {
            "schema_version": cachefile.SCHEMA_VERSION,
            "model_name": cfg.model.name,
            "dataset_name": source.name,
            "embed_dim": embed_dim,
            "domains": json.dumps([d.name for d in source.domains]),
            "class_names": json.dumps(source.class_names),
            "prompt_names": json.dumps(source.prompt_names),
            "prompt_templates": json.dumps(templates),
            "image_dtype": cfg.cache_dtype,
            "inputs_fingerprint": cachefile.inputs_fingerprint(source.domains),
            "model_num_parameters": num_parameters(model),
            "model_revision": model_revision(model),
            "model_dtype": str(model.dtype).replace("torch.", ""),
            "preprocessing": json.dumps(processor.to_dict(), default=str),
            "source": json.dumps(source.provenance),
            "versions": json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                                    "h5py": h5py.__version__, "numpy": np.__version__}),
            "device": device.type,
        }
        with cachefile.open_partial(path, header) as f:
            cachefile.write_text(f, text.numpy().reshape(len(templates), len(source.class_names), embed_dim),
                                 float(model.logit_scale.detach().exp()))
            counts = {}
            try:
                for domain in source.domains:
                    counts[domain.name] = encode_domain(f, domain, model, processor, cfg, embed_dim)
            except KeyboardInterrupt:
                log.error("interrupted: %s keeps what was done; re-run the same command to resume",
                          cachefile.partial_path(path))
                raise
            f.attrs["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            f.attrs["complete"] = True
        cachefile.publish(path)
    total = sum(n for n, _ in counts.values())
    skipped = sum(s for _, s in counts.values())
    log.info("wrote %s: %d images (%s), %d skipped, %d classes, dim %d, %.1f s", path, total,
             ", ".join(f"{d} {n}" for d, (n, _) in counts.items()), skipped, len(source.class_names),
             embed_dim, time.time() - start)
    return path
