"""`run_images(cfg, method, output_dir, start)`: one experiment that trains the backbone on the images.

The recipe of the cached runner (federate/run.py), with images instead of embeddings:
1. the images (extract's source: hub or dataset.root, the cache's ids) and the model;
2. leave-one-domain-out and the 60/20/20 splits of federate.splits (same ids as a cached run);
3. rounds: each participant in turn trains from the global state, the server keeps a running weighted
   sum and then applies the strategy; validation, model selection (federate.experiment.RunLog);
4. summary.json (the cached methods' keys plus `backbone`, `seconds_per_round`), history.jsonl,
   splits.json and model.safetensors (the selected round's global state dict, float32).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from .. import adapters, strategy
from ..experiment import (RunLog, check_finite, cost_figures, finish, mean, resolve_device, summarize, target_and_participants,
                          train_settings)
from ..splits import splits_to_ids
from . import ADAPTER_METHODS
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
    settings = backbone_settings(cfg, train_settings(cfg, method))

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
    weights = strategy.client_weights(num_examples, server.aggregation).tolist()
    keys = {d: {p: [(index[d], int(i)) for i in splits[d][p]] for p in ("val", "test")} for d in clients}
    target_keys = [(index[target], i) for i in range(len(by_name[target]))]

    model = model.to_device(device) if hasattr(model, "to_device") else model.to(device)
    global_state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sent = state_bytes(global_state)
    clip_params = (sum(p.numel() for p in model.clip.parameters()) if backbone == "clip" else vit_b32_params())
    costs = cost_figures(method, trainable, len(clients), clip_params, int(cfg.rounds), sent_bytes=sent)
    log.info("%s (backbone %s) on %s images: target %s (%d images), clients %s (train images %s), %s trainable "
             "parameters, %.1f MB sent per client and direction per round, device %s, %d loader workers",
             method.name, backbone, source.name, target, len(target_keys), ", ".join(clients), num_examples,
             f"{trainable:,}", sent / 1e6, device.type, workers)

    # 3. rounds
    runlog = RunLog(output_dir, int(cfg.rounds))
    ids_of = {d: tuple(by_name[d].ids) for d in participants}
    (output_dir / "splits.json").write_text(json.dumps(splits_to_ids(splits, ids_of)))
    seconds, train_seconds = [], []
    try:
        for r in range(1, int(cfg.rounds) + 1):
            t0 = time.perf_counter()
            total = RunningMean(global_state)
            row = {"train_loss": {}}
            for k, d in enumerate(clients):
                model.load_state_dict(global_state)
                batches = client_batches(splits[d]["train"], index[d], d, seed, r, int(cfg.batch_size),
                                         int(cfg.local_epochs))
                row["train_loss"][d] = local_update(model, loader.batches(batches), settings, device,
                                                    anchor=global_state, rng_seed=dropout_seed(seed, d, r))
                total.add(model.state_dict(), weights[k])
            averaged = total.result()
            check_finite(r, row["train_loss"], averaged, cfg.lr)
            global_state = server.aggregate_train(global_state, {k: v.unsqueeze(0) for k, v in averaged.items()}, [1])
            del total, averaged
            check_finite(r, {}, global_state, cfg.lr)
            model.load_state_dict(global_state)
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_seconds.append(time.perf_counter() - t0)
            val = {d: accuracy(model, loader.batches(eval_batches(keys[d]["val"], eval_size)), device)
                   for d in clients}
            row.update(round=r, val_acc=val, val_mean=mean(val.values()))
            if runlog.improves(val):
                test = {d: accuracy(model, loader.batches(eval_batches(keys[d]["test"], eval_size)), device)
                        for d in clients}
                target_acc = accuracy(model, loader.batches(eval_batches(target_keys, eval_size)), device)
                runlog.record_best(r, val, test, target_acc, [global_state])
                row.update(test_acc=test, target_acc=target_acc, improved=True)
            seconds.append(time.perf_counter() - t0)
            row.update(seconds=seconds[-1], train_seconds=train_seconds[-1])
            runlog.end_round(row, int(cfg.rounds))
    finally:
        runlog.close()
        loader.loader = None  # stops the persistent workers
    best = runlog.best

    # 4. outputs
    adapter = adapters.build(cfg.adapter, text_tower=cfg.text_adapter) if method.name in ADAPTER_METHODS else None
    summary = summarize(cfg, method, source.name, cfg.model.name, target, best, costs,
                        {d: {p: len(splits[d][p]) for p in ("train", "val", "test")} for d in clients},
                        len(target_keys), adapter, server)
    summary.update(backbone=backbone, engine=None, seconds_per_round=mean(seconds),
                   train_seconds_per_round=mean(train_seconds), device=device.type,
                   precision="bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32",
                   image_size=(int(cfg.backbone.image_size) if backbone == "alexnet" else
                               int(model.clip.config.vision_config.image_size)))
    summary.update(optimizer=settings.describe())  # a variant key of the report
    save_model(output_dir / "model.safetensors", best, method, backbone, source.name, cfg.model.name, target, cfg)
    return finish(output_dir, summary, cfg, start)


def save_model(path: Path, best: dict, method, backbone: str, dataset: str, model: str, target: str, cfg) -> None:
    """The global state dict of the selected round in float32 (keys: the model's state dict)."""
    tensors = {k: v.detach().float().contiguous().cpu().clone() for k, v in best["states"][0].items()}
    config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    save_file(tensors, str(path), metadata={
        "method": method.name, "backbone": backbone, "model": model if backbone == "clip" else "alexnet",
        "dataset": dataset, "target_domain": target, "round": str(best["round"]), "config": json.dumps(config)})
