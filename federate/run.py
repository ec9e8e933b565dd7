"""`run(cfg, output_dir)`: the entry point of one experiment (conf/federate.yaml); it picks the backend.

In process, a run is a numbered recipe:
1. load the cache and check the settings;  2. split every participating domain 60/20/20;
3. put the clients' data on the device;  4. run the rounds (local training, the server strategy,
validation, model selection);  5. optionally fine-tune locally;  6. write summary.json, history.jsonl,
splits.json and adapter.safetensors.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from extract.commands import extract_command

from . import adapters, prepared, strategy
from .cache import load_cache
from .engine import ClientSets, TrainSettings, autocast, client_generator, make_trainer
from .evaluate import accuracies, pick
from .experiment import (RunLog, cache_path, check_finite, check_settings, class_text,
                         cost_figures, domain_tensors, evaluate_round, finish, make_client, mean, resolve_device,
                         save_adapters, summarize, target_and_participants, train_settings)
from .partition import check_runner, make_clients, restrict_classes, splits_json

log = logging.getLogger("federate")


def run(cfg, output_dir: str | Path) -> dict:
    """Run the experiment `cfg` and return its summary: in process, or through Flower (`backend=flower`).
    A job whose point a grouped sweep already trained (hydra/launcher=batched, federate/sweep.py) only
    hands over that result."""
    start = time.time()
    output_dir = Path(output_dir)
    result = prepared.take(output_dir)
    if result is not None:
        return result()
    output_dir.mkdir(parents=True, exist_ok=True)
    method = check_settings(cfg)
    check_runner(cfg, method)  # partitions and class subsets: the in-process runner only
    if cfg.backend == "flower":
        from .flower.simulation import run_simulation

        return run_simulation(cfg, cache_path(cfg), output_dir)
    if method.images:  # the backbone trains on the images (federate/backbone/)
        from .backbone import run_images

        return run_images(cfg, method, output_dir, start)
    return run_local(cfg, method, output_dir, start)


@dataclass
class Point:
    """One experiment's state between its steps (a sweep of grouped points holds many)."""
    cfg: Any
    method: Any
    output_dir: Path
    adapter: Any
    server: Any
    cache: Any
    target: str
    clients: list
    target_set: tuple
    text: torch.Tensor
    global_state: dict
    cost: dict
    runlog: RunLog
    settings: TrainSettings | None = None
    train_sets: list = field(default_factory=list)
    train_names: list = field(default_factory=list)


def setup(cfg, method, output_dir: Path, progress: bool = True) -> Point:
    """Steps 1-3: the cache, the splits (splits.json), the clients' data on the device, the initial
    adapter and the run log (with a progress bar on a terminal, unless `progress` is false)."""
    device = resolve_device(cfg.device)
    torch.set_flush_denormal(True)  # softmax over 512 dims makes tiny gradients; denormals are 10x slower
    adapter = adapters.build(cfg.adapter, text_tower=cfg.text_adapter) if method.trains != "none" else adapters.Adapter()
    server = strategy.build(cfg.strategy, cfg.aggregation)

    # 1. the cache
    cache = restrict_classes(load_cache(cache_path(cfg), cfg.model.name, extract_command=extract_command(cfg)),
                             cfg.dataset.get("classes"))
    adapter.prepare(cache, cfg.model)
    target, participants = target_and_participants(list(cache.domains), cfg.target_domain, cache.path)

    # 2. clients and their splits (federate/partition.py)
    splits = make_clients(cache, participants, cfg)

    # 3. data on the device, largest training split first (the lock-step engines' order)
    clients = sorted((make_client(cache, s, device) for s in splits), key=lambda c: -len(c.train[1]))
    names = [c.name for c in clients]
    target_set = domain_tensors(cache, target, device)
    text = class_text(cache, device)
    global_state = {k: v.to(device) for k, v in
                    adapters.init_params(adapter, cache.embed_dim, int(cfg.seed), text).items()}
    trainable = adapters.num_parameters(global_state)
    cost = cost_figures(method, trainable, len(clients), cache.model_num_parameters, int(cfg.rounds))
    log.info("%s on %s: target %s, clients %s (train rows %s), adapter %s, %s trainable parameters", method.name,
             cache.dataset_name, target, ", ".join(names), [len(c.train[1]) for c in clients], adapter.name,
             f"{trainable:,}")

    runlog = RunLog(output_dir, int(cfg.rounds) if method.trains != "none" else 1, progress)
    (output_dir / "splits.json").write_text(json.dumps(splits_json(splits, cache)))
    point = Point(cfg, method, output_dir, adapter, server, cache, target, clients, target_set, text, global_state,
                  cost, runlog)
    if method.trains != "none":
        point.settings = train_settings(cfg, method)
        if method.trains == "pooled":  # one adapter on the pooled training rows of all participants
            point.train_sets = [(torch.cat([c.train[0] for c in clients]), torch.cat([c.train[1] for c in clients]))]
            point.train_names = ["pooled"]
        else:
            point.train_sets, point.train_names = [c.train for c in clients], [c.name for c in clients]
    return point


def run_local(cfg, method, output_dir: Path, start: float) -> dict:
    point = setup(cfg, method, output_dir)
    # 4. rounds
    try:
        if method.trains == "none":
            evaluate_round(point.runlog, point.adapter, point.cache.logit_scale, 0, 0, [{}] * len(point.clients),
                           [{}], point.clients, point.target_set, point.text, {})
        else:
            federate(point)
    finally:
        point.runlog.close()
    return conclude(point, start)


def conclude(point: Point, start: float) -> dict:
    """Steps 5-6: the summary of the selected round, optional local fine-tuning, the outputs."""
    cfg, method, cache, clients = point.cfg, point.method, point.cache, point.clients
    best = point.runlog.best
    summary = summarize(cfg, method, cache.dataset_name, cache.model_name, point.target, best, point.cost,
                        {c.name: c.sizes() for c in clients}, len(point.target_set[1]), point.adapter, point.server)

    # 5. local fine-tuning of the selected global adapter (paper Fig. 3c)
    if int(cfg.finetune_epochs) and method.trains != "none" and not method.personal:
        summary["personalization_finetuned"] = finetune(cfg, point.adapter, clients, best["states"][0], point.text,
                                                        cache.logit_scale)
        summary["personalization_finetuned_mean"] = mean(summary["personalization_finetuned"].values())

    # 6. outputs
    if method.trains != "none":
        save_adapters(point.output_dir / "adapter.safetensors", method, [c.name for c in clients], best,
                      cache.dataset_name, cache.model_name, cache.embed_dim, point.target, cfg)
    return finish(point.output_dir, summary, cfg, start)


def federate(point: Point) -> None:
    settings, train_sets = point.settings, point.train_sets
    trainer = make_trainer(point.cfg.engine, point.adapter, ClientSets(*zip(*train_sets)), point.text,
                           point.cache.logit_scale, settings)
    stacked = strategy.stack(point.global_state, len(train_sets))
    for r in range(1, int(point.cfg.rounds) + 1):
        losses = trainer.train(stacked, int(point.cfg.local_epochs), generators(point, r),
                               anchor=point.global_state if settings.mu else None)
        end_round(point, r, stacked, losses)


def generators(point: Point, round_: int) -> list:
    return [client_generator(int(point.cfg.seed), n, round_) for n in point.train_names]


def end_round(point: Point, r: int, stacked: dict, losses: torch.Tensor) -> None:
    """After round r's local training of the point's clients (`stacked`, in place): the server strategy,
    validation and model selection, history.jsonl."""
    cfg, method, clients = point.cfg, point.method, point.clients
    row = {"train_loss": dict(zip(point.train_names, losses.tolist()))}
    check_finite(r, row["train_loss"], stacked, cfg.lr)
    if method.aggregates:
        num_examples = [len(y) for _, y in point.train_sets]
        point.global_state = point.server.aggregate_train(point.global_state, stacked, num_examples)
        check_finite(r, {}, point.global_state, cfg.lr)
        strategy.configure_train(stacked, point.global_state)
    if method.personal:
        client_states = [pick(stacked, i) for i in range(len(clients))]
        target_states = client_states  # no global model: the mean of the clients' own adapters
    else:
        shared = pick(stacked, 0)  # after aggregation (or with one pooled client) all are equal
        client_states, target_states = [shared] * len(clients), [shared]
    with autocast(point.settings.precision, point.text.device):  # bf16: evaluation's matmuls too
        evaluate_round(point.runlog, point.adapter, point.cache.logit_scale, r, int(cfg.rounds), client_states,
                       target_states, clients, point.target_set, point.text, row)


def finetune(cfg, adapter, clients, selected, text, scale) -> dict[str, float]:
    """Each participant fine-tunes the selected adapter on its own training split; test accuracy after."""
    settings = TrainSettings(lr=float(cfg.lr), batch_size=int(cfg.batch_size), loss=cfg.loss,
                             precision=cfg.get("precision", "fp32"))
    trainer = make_trainer(cfg.engine, adapter, ClientSets([c.train[0] for c in clients], [c.train[1] for c in clients]),
                           text, scale, settings)
    stacked = strategy.stack(selected, len(clients))
    trainer.train(stacked, int(cfg.finetune_epochs), [client_generator(int(cfg.seed), c.name, "finetune") for c in clients])
    with autocast(settings.precision, text.device):
        test = accuracies(adapter, [pick(stacked, i) for i in range(len(clients))], [c.test for c in clients], text,
                          scale)
    log.info("after %d fine-tuning epochs: personalization %s", cfg.finetune_epochs,
             ", ".join(f"{c.name} {100 * a:.2f}%" for c, a in zip(clients, test)))
    return {c.name: a for c, a in zip(clients, test)}
