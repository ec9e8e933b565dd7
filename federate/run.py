"""`run(cfg, output_dir)`: the entry point of one experiment (conf/federate.yaml); it picks the backend.

In process, a run is a numbered recipe:
1. load the cache and check the settings;  2. make the clients (federate/partition.py: one per
participating domain by default, each split 60/20/20);  3. put the clients' data on the device;
4. run the rounds (federate/federation.py: sampling, local training, the server strategy, evaluation,
records, model selection, checkpoint);  5. optionally fine-tune locally;  6. write summary.json,
history.jsonl, splits.json and adapter.safetensors.
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
from extract.files import own_folder, write_text

from . import adapters, prepared, rows, strategy
from .cache import load_cache
from .engine import ClientSets, TrainSettings, client_generator, make_trainer
from .evaluate import accuracies, pick
from .experiment import (cache_path, capped_batch, check_settings, class_text, cost_figures, describe_clients, domain_rows,
                         finish, identity_of, make_client, mean, pooled_embeddings, resolve_device, save_adapters,
                         summarize, target_and_participants, train_settings)
from .federation import ClientInfo, Federation, Update
from .partition import check_runner, make_clients, restrict_classes, splits_json
from .sweep_folder import finished_run

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
    kept = finished_run(output_dir, cfg)  # a sweep finished in place keeps its finished jobs (federate/sweep_folder.py)
    if kept is not None:
        return kept
    own_folder(output_dir)  # (a link is refused: nothing is written through it)
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
    target: str | None
    clients: list
    target_set: tuple | None
    text: torch.Tensor
    cost: dict
    federation: Federation
    identity: dict
    settings: TrainSettings | None = None
    train_sets: list = field(default_factory=list)


def setup(cfg, method, output_dir: Path, progress: bool = True) -> Point:
    """Steps 1-3: the cache, the clients and their splits (splits.json), their data on the device, the
    initial adapter and the rounds' records (resumed from the folder's checkpoint if it has one; with a
    progress bar on a terminal, unless `progress` is false)."""
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
    pool = pooled_embeddings(cache, device)  # the embeddings once; clients and the target are rows of it
    clients = sorted((make_client(cache, s, pool) for s in splits), key=lambda c: -len(c.train))
    target_set = domain_rows(cache, target, pool) if target is not None else None
    text = class_text(cache, device)
    global_state = {k: v.to(device) for k, v in
                    adapters.init_params(adapter, cache.embed_dim, int(cfg.seed), text).items()}
    trainable = adapters.num_parameters(global_state)
    log.info("%s on %s: target %s, %s, adapter %s, %s trainable parameters", method.name, cache.dataset_name,
             target, describe_clients(clients), adapter.name, f"{trainable:,}")

    infos = [ClientInfo(c.name, c.domain, c.sizes()) for c in clients]
    federation = Federation(cfg, method, infos, global_state, server, output_dir, target=target, progress=progress)
    cost = cost_figures(method, trainable, federation.trained_per_round, cache.model_num_parameters, int(cfg.rounds))
    write_text(output_dir / "splits.json", json.dumps(splits_json(splits, cache)))
    point = Point(cfg, method, output_dir, adapter, server, cache, target, clients, target_set, text, cost,
                  federation, identity_of(cache, output_dir / "splits.json"))
    if method.trains != "none":
        if method.trains == "pooled":  # one adapter on the pooled training rows of all participants
            point.train_sets = [rows.concat([c.train for c in clients])]
        else:
            point.train_sets = [c.train for c in clients]
        point.settings = capped_batch(train_settings(cfg, method), max(len(s) for s in point.train_sets))
    return point


class CachedBackend:
    """Local training and evaluation of a point's clients on the cached tensors (federate/federation.py)."""

    def __init__(self, point: Point):
        self.point = point
        self._trainer, self._sampled = None, None

    def trainer(self, sampled: list[int]):
        """An engine over the sampled units (kept while the sample stays the same: all clients, by default)."""
        p = self.point
        if sampled != self._sampled:
            sets = [p.train_sets[i] for i in sampled]
            self._trainer = make_trainer(p.cfg.engine, p.adapter, ClientSets(sets), p.text,
                                         p.cache.logit_scale, p.settings)
            self._sampled = list(sampled)
        return self._trainer

    def train(self, federation: Federation, round_: int, sampled: list[int]) -> Update:
        p = self.point
        names = [federation.units[i] for i in sampled]
        sizes = [len(p.train_sets[i]) for i in sampled]
        trainer, gens, epochs = self.trainer(sampled), generators(p, round_, names), int(p.cfg.local_epochs)
        anchor = federation.global_state if p.settings.mu else None
        if self.adds_up(federation, trainer):  # one pre-averaged update: the strategy reads only the mean
            weights = strategy.client_weights(sizes, p.server.aggregation).tolist()
            mean, losses = trainer.train_mean(federation.global_state, epochs, gens, weights, anchor)
            return Update({k: v.unsqueeze(0) for k, v in mean.items()}, [1], dict(zip(names, losses.tolist())))
        state = federation.start_states(sampled)
        losses = trainer.train(state, epochs, gens, anchor=anchor)
        return Update(state, sizes, dict(zip(names, losses.tolist())))

    def adds_up(self, federation: Federation, trainer) -> bool:
        """Whether the clients' adapters can be added up as they train (SequentialTrainer.train_mean): every
        sampled client starts from the global adapter and the strategy reads only their weighted mean."""
        return (federation.method.aggregates and federation.personal is None and hasattr(trainer, "train_mean")
                and not self.point.server.reads_each_client)

    def evaluate(self, client_states: list, target_states: list, parts: set) -> dict:
        """Accuracies in fp32 whatever the training precision (bf16 would flip some predictions)."""
        p, out = self.point, {}
        for part in ("val", "test"):
            if part in parts:
                out[part] = dict(zip([c.name for c in p.clients], accuracies(
                    p.adapter, client_states, [getattr(c, part) for c in p.clients], p.text, p.cache.logit_scale)))
        if "target" in parts:
            out["target"] = accuracies(p.adapter, target_states, [p.target_set] * len(target_states), p.text,
                                       p.cache.logit_scale)
        return out


def run_local(cfg, method, output_dir: Path, start: float) -> dict:
    point = setup(cfg, method, output_dir)
    # 4. rounds
    point.federation.run(CachedBackend(point))
    return conclude(point, start)


def conclude(point: Point, start: float) -> dict:
    """Steps 5-6: the summary of the selected round, optional local fine-tuning, the outputs."""
    cfg, method, cache, clients, federation = point.cfg, point.method, point.cache, point.clients, point.federation
    summary = summarize(cfg, method, cache.dataset_name, cache.model_name, federation, point.cost,
                        len(point.target_set) if point.target_set is not None else None, point.adapter,
                        point.server, point.identity)

    # 5. local fine-tuning of the selected global adapter (paper Fig. 3c)
    best = federation.best
    if int(cfg.finetune_epochs) and method.trains != "none" and not method.personal:
        summary["personalization_finetuned"] = finetune(cfg, point.adapter, clients, best["states"][0], point.text,
                                                        cache.logit_scale)
        summary["personalization_finetuned_mean"] = mean(summary["personalization_finetuned"].values())

    # 6. outputs
    if method.trains != "none":
        save_adapters(point.output_dir / "adapter.safetensors", method, [c.name for c in clients], best,
                      cache.dataset_name, cache.model_name, cache.embed_dim, point.target, cfg)
    summary = finish(point.output_dir, summary, cfg, start)
    federation.finished()
    return summary


def generators(point: Point, round_: int, names: list[str]) -> list:
    return [client_generator(int(point.cfg.seed), n, round_) for n in names]


def finetune(cfg, adapter, clients, selected, text, scale) -> dict[str, float]:
    """Each participant fine-tunes the selected adapter on its own training split; test accuracy after."""
    settings = capped_batch(TrainSettings(lr=float(cfg.lr), batch_size=int(cfg.batch_size), loss=cfg.loss,
                                          precision=cfg.get("precision", "fp32")), max(len(c.train) for c in clients))
    trainer = make_trainer(cfg.engine, adapter, ClientSets([c.train for c in clients]), text, scale, settings)
    stacked = strategy.stack(selected, len(clients))
    trainer.train(stacked, int(cfg.finetune_epochs), [client_generator(int(cfg.seed), c.name, "finetune") for c in clients])
    test = accuracies(adapter, [pick(stacked, i) for i in range(len(clients))], [c.test for c in clients], text, scale)
    log.info("after %d fine-tuning epochs: personalization %s", cfg.finetune_epochs,
             ", ".join(f"{c.name} {100 * a:.2f}%" for c, a in zip(clients, test)))
    return {c.name: a for c, a in zip(clients, test)}
