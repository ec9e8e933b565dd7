"""`run_images(cfg, method, output_dir, start)`: one experiment that trains the backbone on the images.

The recipe of the cached runner (federate/run.py), with images instead of embeddings:
1. the images (extract's source: hub or dataset.root, the cache's ids) and the model;
2. leave-one-domain-out and the 60/20/20 splits of federate.splits (same ids as a cached run);
3. rounds (federate/federation.py, with `ImageBackend`): each sampled participant in turn trains from the
   global state, the server keeps a running weighted sum and then applies the strategy; validation every
   round, test and target accuracies when the selection rule needs them (the selected rounds);
4. summary.json (the cached methods' keys plus `backbone`, `seconds_per_round`), history.jsonl,
   splits.json and model.safetensors (the selected round's global state dict, float32).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from extract.files import atomic_path, write_text

from .. import adapters, strategy
from ..errors import ConfigError
from ..experiment import cost_figures, mean, resolve_device, target_and_participants
from ..lifecycle import Experiment, execute
from ..federation import ClientInfo, Federation
from ..training import Update
from ..splits import splits_to_ids
from .build import build_model, check
from .data import Images, Loader, default_workers, domain_splits, load_images, probe
from .optim import backbone_settings
from .train import RunningMean, accuracy, client_batches, dropout_seed, local_update

log = logging.getLogger("federate")
VIT_B32_PARAMS = None  # counted once (meta device) for the summary's comparison with full CLIP ViT-B/32


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """What one model update weighs on the wire: every entry of the state dict, at its dtype (float32)."""
    return sum(v.numel() * v.element_size() for v in state.values())


def vit_b32_params() -> int:
    global VIT_B32_PARAMS
    if VIT_B32_PARAMS is None:
        from transformers import CLIPConfig, CLIPModel

        with torch.device("meta"):
            VIT_B32_PARAMS = sum(p.numel() for p in CLIPModel(CLIPConfig()).parameters())
    return VIT_B32_PARAMS


def eval_batches(keys: list[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    return [keys[s:s + size] for s in range(0, len(keys), size)]


def run_images(cfg, method, output_dir: Path, start: float) -> dict:
    output_dir = Path(output_dir)
    backbone = check(cfg, method)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed = int(cfg.seed)
    workers = default_workers(cfg.backbone.get("num_workers", "auto"), device)
    eval_size = int(cfg.backbone.get("eval_batch_size", 128))
    server = strategy.build(cfg.strategy, cfg.aggregation)
    if server.reads_each_client:  # one model in memory: the clients are added up as they train
        raise ConfigError(f"strategy={server.name} reads each client's model; the image backbones hand the strategy "
                          "the weighted mean of the clients' models (pick a strategy that reads only that mean)")
    settings = backbone_settings(cfg, method.train_settings(cfg))

    # 1. images and model
    source = load_images(cfg.dataset, method.name)
    names = [d.name for d in source.domains]
    target, participants = target_and_participants(names, cfg.target_domain, source.provenance.get("root")
                                                   or source.provenance.get("hub_id") or source.name)
    model, processor = build_model(cfg, method, source, seed)
    domains = probe(source.domains, processor, workers)
    by_name = {d.name: d for d in domains}

    # 2. splits (the cached methods' rule and ids)
    splits = domain_splits(by_name, participants, seed, cfg.split_file)
    index = {d.name: k for k, d in enumerate(domains)}
    loader = Loader(Images(domains, processor), [d.labels for d in domains], [d.ids for d in domains],
                    [d.name for d in domains], device, workers)
    clients = sorted(participants, key=lambda d: -len(splits[d]["train"]))  # the cached runners' order
    num_examples = [len(splits[d]["train"]) for d in clients]
    keys = {d: {p: [(index[d], int(i)) for i in splits[d][p]] for p in ("val", "test")} for d in clients}
    target_keys = [(index[target], i) for i in range(len(by_name[target]))] if target is not None else []

    model = model.to_device(device) if hasattr(model, "to_device") else model.to(device)
    global_state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    clip_params = (sum(p.numel() for p in model.clip.parameters()) if backbone == "clip" else vit_b32_params())
    log.info("%s (backbone %s) on %s images: target %s (%d images), clients %s (train images %s), %s trainable "
             "parameters, %.1f MB sent per client and direction per round, device %s, %d loader workers",
             method.name, backbone, source.name, target, len(target_keys), ", ".join(clients), num_examples,
             f"{trainable:,}", state_bytes(global_state) / 1e6, device.type, workers)

    # 3. rounds (federate/federation.py)
    infos = [ClientInfo(d, d, {p: len(splits[d][p]) for p in ("train", "val", "test")}) for d in clients]
    splits_text = json.dumps(splits_to_ids(splits, {d: tuple(by_name[d].ids) for d in participants}))
    identity = {"cache_identity_sha256": None, "cache_checksums": None,
                "splits_sha256": hashlib.sha256(splits_text.encode()).hexdigest(), **images_identity(cfg, source, backbone)}
    federation = Federation(cfg, method, infos, global_state, server, output_dir, target=target, every_round=False,
                            inputs=identity)
    costs = cost_figures(method, federation, clip_params, federation.rounds)
    costs["trainable_params"] = trainable  # (the state dict also holds buffers)
    costs["shared_params"] = sum(v.numel() for v in global_state.values())
    costs["fedavg_full_clip"]["param_ratio"] = clip_params / trainable if trainable else None
    write_text(output_dir / "splits.json", splits_text)
    backend = ImageBackend(cfg, model, loader, settings, device, server, splits, index, keys, target_keys, eval_size)

    # 4. outputs

    def extras() -> dict:
        loader.loader = None  # stops the persistent workers
        return dict(backbone=backbone, engine=None,
                    seconds_per_round=mean(backend.seconds) if backend.seconds else None,
                    train_seconds_per_round=mean(backend.train_seconds) if backend.train_seconds else None,
                    device=device.type, precision="bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32",
                    image_size=(int(cfg.backbone.image_size) if backbone == "alexnet" else
                                int(model.clip.config.vision_config.image_size)),
                    optimizer=settings.describe())  # a variant key of the report

    adapter = adapters.build(cfg.adapter, text_tower=cfg.text_adapter) if method.adapter else None
    experiment = Experiment(cfg, method, federation, output_dir, source.name, cfg.model.name, adapter, server, costs,
                            identity, len(target_keys) if target is not None else None,
                            save=lambda best: save_model(output_dir / "model.safetensors", best, method, backbone,
                                                         source.name, cfg.model.name, target, cfg),
                            extras=extras)
    try:
        return execute(experiment, backend, start)
    finally:
        loader.loader = None  # stops the persistent workers


def images_identity(cfg, source, backbone: str) -> dict:
    """What a run on the images computed on, in the terms a cache records it (extract/cache.py): the
    inputs' fingerprint (every domain's ids and labels) and, for CLIP, the model's; the report puts the run
    beside the runs on a cache built from the same images and model."""
    from extract.cache import inputs_fingerprint

    model = None
    if backbone == "clip":
        from extract.errors import ExtractError
        from extract.model import resolve_model

        try:
            model = resolve_model(cfg.model, cfg.cache_dir).fingerprint
        except ExtractError as e:
            raise ConfigError(str(e)) from None
    return {"inputs_fingerprint": inputs_fingerprint(source.domains), "model_fingerprint": model}


class ImageBackend:
    """Local training of the sampled clients one after another on the images (the server keeps a running
    weighted sum, so one model's state is held at a time), and evaluation of the global model. Rounds are
    expensive here: validation every round, test and target only when the selection rule needs them
    (Federation(every_round=False))."""

    def __init__(self, cfg, model, loader, settings, device, server, splits, index, keys, target_keys, eval_size):
        self.cfg, self.model, self.loader, self.settings, self.device = cfg, model, loader, settings, device
        self.server, self.splits, self.index, self.keys, self.target_keys = server, splits, index, keys, target_keys
        self.eval_size = eval_size
        self.seconds, self.train_seconds = [], []
        self._t0 = None

    def train(self, federation, round_: int, sampled: list[int]) -> Update:
        t0 = time.perf_counter()
        cfg, seed, glob = self.cfg, int(self.cfg.seed), federation.global_state
        names = [federation.units[i] for i in sampled]
        weights = strategy.client_weights([len(self.splits[d]["train"]) for d in names], self.server.aggregation).tolist()
        total, losses = RunningMean(glob), {}
        for d, weight in zip(names, weights):
            self.model.load_state_dict(glob)
            batches = client_batches(self.splits[d]["train"], self.index[d], d, seed, round_, int(cfg.batch_size),
                                     int(cfg.local_epochs))
            losses[d] = local_update(self.model, self.loader.batches(batches), self.settings, self.device,
                                     anchor=glob, rng_seed=dropout_seed(seed, d, round_))
            total.add(self.model.state_dict(), weight)
        averaged = total.result()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.train_seconds.append(time.perf_counter() - t0)
        self._t0 = t0
        # one pre-averaged update: the strategy sees the weighted mean of the sampled clients
        return Update({k: v.unsqueeze(0) for k, v in averaged.items()}, [1], losses)

    def _accuracy(self, keys) -> float:
        return accuracy(self.model, self.loader.batches(eval_batches(keys, self.eval_size)), self.device)

    def evaluate(self, federation, parts: set) -> dict:
        self.model.load_state_dict(federation.global_state)
        out = {p: {d: self._accuracy(self.keys[d][p]) for d in self.keys} for p in ("val", "test") if p in parts}
        if "target" in parts:
            out["target"] = [self._accuracy(self.target_keys)]
        return out

    def row_timings(self) -> dict:
        """The round's seconds (training, aggregation and evaluation) and its training seconds."""
        self.seconds.append(time.perf_counter() - self._t0)
        return {"seconds": self.seconds[-1], "train_seconds": self.train_seconds[-1]}


def save_model(path: Path, best: dict, method, backbone: str, dataset: str, model: str, target: str, cfg) -> None:
    """The global state dict of the selected round in float32 (keys: the model's state dict)."""
    tensors = {k: v.detach().float().contiguous().cpu().clone() for k, v in best["shared"].items()}
    target = target or "none"
    config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={
            "method": method.name, "backbone": backbone, "model": model if backbone == "clip" else "alexnet",
            "dataset": dataset, "target_domain": target, "round": str(best["row"]["round"]), "config": json.dumps(config)})
