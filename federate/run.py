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
from pathlib import Path

import torch

from . import adapters, strategy
from .cache import load_cache
from .engine import ClientSets, TrainSettings, autocast, client_generator, make_trainer
from .evaluate import accuracies, pick
from .experiment import (RunLog, cache_path, check_finite, check_settings, class_text, client_splits,
                         cost_figures, domain_tensors, evaluate_round, finish, make_client, mean, resolve_device,
                         save_adapters, summarize, target_and_participants, train_settings)
from .splits import splits_to_ids

log = logging.getLogger("federate")


def run(cfg, output_dir: str | Path) -> dict:
    """Run the experiment `cfg` and return its summary: in process, or through Flower (`backend=flower`)."""
    start = time.time()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    method = check_settings(cfg)
    if cfg.backend == "flower":
        from .flower.simulation import run_simulation

        return run_simulation(cfg, cache_path(cfg), output_dir)
    if method.images:  # the backbone trains on the images (federate/backbone/)
        from .backbone import run_images

        return run_images(cfg, method, output_dir, start)
    return run_local(cfg, method, output_dir, start)


def run_local(cfg, method, output_dir: Path, start: float) -> dict:
    device = resolve_device(cfg.device)
    torch.set_flush_denormal(True)  # softmax over 512 dims makes tiny gradients; denormals are 10x slower
    adapter = adapters.build(cfg.adapter, text_tower=cfg.text_adapter) if method.trains != "none" else adapters.Adapter()
    server = strategy.build(cfg.strategy, cfg.aggregation)

    # 1. the cache
    cache = load_cache(cache_path(cfg), cfg.model.name)
    target, participants = target_and_participants(list(cache.domains), cfg.target_domain, cache.path)

    # 2. splits
    splits = client_splits(cache, participants, int(cfg.seed), cfg.split_file)

    # 3. data on the device, largest training split first (the lock-step engines' order)
    clients = sorted((make_client(cache, d, splits[d], device) for d in participants), key=lambda c: -len(c.train[1]))
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

    # 4. rounds
    ids_of = {d: cache.domains[d].ids for d in participants}
    runlog = RunLog(output_dir, int(cfg.rounds) if method.trains != "none" else 1)
    (output_dir / "splits.json").write_text(json.dumps(splits_to_ids(splits, ids_of)))
    try:
        if method.trains == "none":
            evaluate_round(runlog, adapter, cache.logit_scale, 0, 0, [{}] * len(clients), [{}], clients,
                           target_set, text, {})
        else:
            federate(cfg, method, adapter, server, clients, global_state, target_set, text, cache.logit_scale, runlog)
    finally:
        runlog.close()
    best = runlog.best
    summary = summarize(cfg, method, cache.dataset_name, cache.model_name, target, best, cost,
                        {c.name: c.sizes() for c in clients}, len(target_set[1]), adapter, server)

    # 5. local fine-tuning of the selected global adapter (paper Fig. 3c)
    if int(cfg.finetune_epochs) and method.trains != "none" and not method.personal:
        summary["personalization_finetuned"] = finetune(cfg, adapter, clients, best["states"][0], text,
                                                        cache.logit_scale)
        summary["personalization_finetuned_mean"] = mean(summary["personalization_finetuned"].values())

    # 6. outputs
    if method.trains != "none":
        save_adapters(output_dir / "adapter.safetensors", method, names, best, cache.dataset_name,
                      cache.model_name, cache.embed_dim, target, cfg)
    return finish(output_dir, summary, cfg, start)


def federate(cfg, method, adapter, server, clients, global_state, target_set, text, scale, runlog: RunLog) -> None:
    if method.trains == "pooled":  # one adapter on the pooled training rows of all participants
        train_sets = [(torch.cat([c.train[0] for c in clients]), torch.cat([c.train[1] for c in clients]))]
        train_names = ["pooled"]
    else:
        train_sets, train_names = [c.train for c in clients], [c.name for c in clients]
    settings = train_settings(cfg, method)
    trainer = make_trainer(cfg.engine, adapter, ClientSets(*zip(*train_sets)), text, scale, settings)
    stacked = strategy.stack(global_state, len(train_sets))
    num_examples = [len(y) for _, y in train_sets]
    for r in range(1, int(cfg.rounds) + 1):
        generators = [client_generator(int(cfg.seed), n, r) for n in train_names]
        losses = trainer.train(stacked, int(cfg.local_epochs), generators, anchor=global_state if settings.mu else None)
        row = {"train_loss": dict(zip(train_names, losses.tolist()))}
        check_finite(r, row["train_loss"], stacked, cfg.lr)
        if method.aggregates:
            global_state = server.aggregate_train(global_state, stacked, num_examples)
            check_finite(r, {}, global_state, cfg.lr)
            strategy.configure_train(stacked, global_state)
        if method.personal:
            client_states = [pick(stacked, i) for i in range(len(clients))]
            target_states = client_states  # no global model: the mean of the clients' own adapters
        else:
            shared = pick(stacked, 0)  # after aggregation (or with one pooled client) all are equal
            client_states, target_states = [shared] * len(clients), [shared]
        with autocast(settings.precision, text.device):  # bf16: evaluation's matmuls too
            evaluate_round(runlog, adapter, scale, r, int(cfg.rounds), client_states, target_states, clients,
                           target_set, text, row)


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
