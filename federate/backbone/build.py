"""The model a run trains (`backbone=clip | alexnet`, plus the adapter for fedclip_full) and the image
processor its DataLoader workers use."""
from __future__ import annotations

import torch

from .. import adapters
from ..errors import ConfigError
from . import BACKBONES
from .alexnet import MIN_IMAGE_SIZE, AlexNetClassifier, AlexNetProcessor


def check(cfg, method) -> str:
    """The backbone's name once the settings make sense for it."""
    name = cfg.backbone.get("name") if hasattr(cfg.backbone, "get") else None
    if name not in BACKBONES:
        raise ConfigError(f"backbone must be one of {', '.join(BACKBONES)}, not {name!r}")
    if name == "alexnet" and method.adapter:
        raise ConfigError(f"method={method.name} trains FedCLIP's adapter on CLIP's embeddings; it needs "
                          "backbone=clip, not alexnet")
    if name == "alexnet" and cfg.loss != "contrastive":
        raise ConfigError("backbone=alexnet trains its class head with cross-entropy; leave loss at its default")
    if name == "alexnet" and int(cfg.backbone.image_size) < MIN_IMAGE_SIZE:
        raise ConfigError(f"backbone.image_size must be >= {MIN_IMAGE_SIZE} for AlexNet (default 224), "
                          f"not {cfg.backbone.image_size}")
    if method.adapter and cfg.adapter.name != "attai":
        raise ConfigError(f"method={method.name} trains the AttAI adapter with CLIP (paper Fig. 3b); "
                          f"use adapter=attai, not {cfg.adapter.name}")
    if name == "clip":
        templates = list(cfg.backbone.get("prompt_templates") or [])
        if not templates or any("{}" not in str(t) for t in templates):
            raise ConfigError("backbone.prompt_templates must be a non-empty list of strings containing {}")
    return name


def clip_parts(model_cfg, cache_dir: str):
    """(CLIPModel in float32 on the CPU, image processor, tokenizer) through extract's loader."""
    from extract.errors import ExtractError
    from extract.model import load_clip

    try:
        return load_clip(model_cfg, cache_dir, torch.device("cpu"))
    except ExtractError as e:
        raise ConfigError(str(e)) from None


def build_model(cfg, method, source, seed: int):
    """(model on the CPU, processor); the model's parameters are seeded by `seed` where they are new."""
    name = check(cfg, method)
    if name == "alexnet":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AlexNetClassifier(len(source.class_names))
        return model, AlexNetProcessor(int(cfg.backbone.image_size))

    clip, processor, tokenizer = clip_parts(cfg.model, cfg.cache_dir)
    return clip_classifier(clip, tokenizer, list(cfg.backbone.prompt_templates), source.prompt_names, cfg.loss,
                           method.adapter, cfg.adapter, bool(cfg.text_adapter), seed), processor


def clip_classifier(clip, tokenizer, templates, prompt_names, loss, with_adapter: bool, adapter_cfg=None,
                    text_adapter: bool = False, seed: int = 0):
    from .clip import ClipClassifier

    clip = clip.float().train()
    prompts = [t.format(c) for t in templates for c in prompt_names]
    tokens = dict(tokenizer(prompts, padding=True, truncation=True, return_tensors="pt"))
    adapter_state = None
    if with_adapter:  # the cached fedclip's initial adapter for the same seed
        adapter = adapters.build(adapter_cfg, text_tower=text_adapter)
        dim = int(clip.config.projection_dim)
        adapter_state = adapters.init_params(adapter, dim, seed, torch.zeros(len(prompt_names), dim))
    return ClipClassifier(clip, tokens, len(templates), len(prompt_names), loss, adapter_state)
