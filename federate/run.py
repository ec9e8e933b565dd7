"""`run(cfg, output_dir)`: the entry point of one experiment (conf/federate.yaml): the method's runner, or
Flower's simulation (`backend=flower`).

In process, on the cached embeddings, a run is a numbered recipe (federate/lifecycle.py):
1. load the cache and check the settings;  2. make the clients (federate/partition.py: one per
participating domain by default, each split 60/20/20);  3. put the clients' data on the device;
4. run the rounds (federate/federation.py: sampling, the method's local update, the server strategy,
evaluation, records, model selection, checkpoint);  5. optionally fine-tune locally;  6. write
summary.json, history.jsonl, splits.json and adapter.safetensors.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from extract.commands import extract_command
from extract.files import own_folder, write_text

from . import adapters, prepared, privacy, rows, strategy
from .cache import load_cache
from .engine import ClientSets, TrainSettings, make_trainer
from .evaluate import accuracies, pick
from .experiment import (cache_path, capped_batch, check_settings, class_text, cost_figures, describe_clients, domain_rows,
                         identity_of, make_client, pooled_embeddings, resolve_device, save_adapters,
                         target_and_participants)
from .federation import ClientInfo, Federation
from .lifecycle import Experiment, execute
from .partition import check_flower, make_clients, restrict_classes, splits_json
from .sweep_folder import finished_run
from .training import LocalTraining, Update

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
    if cfg.backend == "flower":
        from .flower.simulation import run_simulation

        check_flower(cfg)  # the Flower apps: every class
        return run_simulation(cfg, cache_path(cfg), output_dir)
    return method.run(cfg, output_dir, start)  # the cached embeddings (run_cached), or the images


def run_cached(cfg, method, output_dir: Path, start: float) -> dict:
    """One experiment in process on the cached embeddings."""
    point = setup(cfg, method, output_dir)
    return execute(point.experiment, CachedBackend(point), start)


@dataclass
class Point:
    """One experiment's state between its steps (a sweep of grouped points holds many)."""
    cfg: Any
    method: Any
    output_dir: Path
    adapter: Any  # the clients' model (the method's model of the run's adapter)
    server: Any
    cache: Any
    target: str | None
    clients: list
    target_set: Any
    text: torch.Tensor
    federation: Federation
    experiment: Experiment | None = None
    settings: TrainSettings | None = None
    train_sets: list = field(default_factory=list)  # each training unit's rows


def setup(cfg, method, output_dir: Path, progress: bool = True) -> Point:
    """Steps 1-3: the cache, the clients and their splits (splits.json), their data on the device, the
    initial model and the rounds' records (resumed from the folder's checkpoint if it has one; with a
    progress bar on a terminal, unless `progress` is false)."""
    device = resolve_device(cfg.device)
    torch.set_flush_denormal(True)  # softmax over 512 dims makes tiny gradients; denormals are 10x slower
    model = method.model(adapters.build(cfg.adapter, text_tower=cfg.text_adapter))
    server = strategy.build(cfg.strategy, cfg.aggregation)

    # 1. the cache
    cache = restrict_classes(load_cache(cache_path(cfg), cfg.model.name, extract_command=extract_command(cfg)),
                             cfg.dataset.get("classes"))
    model.prepare(cache, cfg.model)
    target, participants = target_and_participants(list(cache.domains), cfg.target_domain, cache.path)

    # 2. clients and their splits (federate/partition.py)
    splits = make_clients(cache, participants, cfg)

    # 3. data on the device, largest training split first (the lock-step engines' order)
    pool = pooled_embeddings(cache, device)  # the embeddings once; clients and the target are rows of it
    clients = sorted((make_client(cache, s, pool) for s in splits), key=lambda c: -len(c.train))
    target_set = domain_rows(cache, target, pool) if target is not None else None
    text = class_text(cache, device)
    init = {k: v.to(device) for k, v in adapters.init_params(model, cache.embed_dim, int(cfg.seed), text).items()}
    log.info("%s on %s: target %s, %s, adapter %s, %s trainable parameters", method.name, cache.dataset_name,
             target, describe_clients(clients), model.name, f"{adapters.num_parameters(init):,}")

    infos = [ClientInfo(c.name, c.domain, c.sizes()) for c in clients]
    splits_text = json.dumps(splits_json(splits, cache))
    identity = identity_of(cache, splits_text)
    federation = Federation(cfg, method, infos, init, server, output_dir, target=target, progress=progress,
                            inputs=identity)
    server = privacy.wrap(federation)  # privacy=dp_client: DP-FedAvg around the strategy
    write_text(output_dir / "splits.json", splits_text)
    point = Point(cfg, method, output_dir, model, server, cache, target, clients, target_set, text, federation)
    point.experiment = Experiment(
        cfg, method, federation, output_dir, cache.dataset_name, cache.model_name, model, server,
        cost_figures(method, federation, cache.model_num_parameters, federation.rounds),
        identity, len(target_set) if target_set is not None else None,
        save=lambda best: save_adapters(output_dir / "adapter.safetensors", method, [c.name for c in clients], best,
                                        cache.dataset_name, cache.model_name, cache.embed_dim, target, cfg),
        finetune=lambda best: finetune(point, best))
    if federation.rounds:
        point.train_sets = [rows.concat([clients[i].train for i in m]) for m in federation.unit_members]
        point.settings = capped_batch(privacy.train_settings(method.train_settings(cfg), federation),
                                      max(len(s) for s in point.train_sets))
    return point


class CachedBackend:
    """Local training and evaluation of a point's clients on the cached tensors (federate/federation.py)."""

    def __init__(self, point: Point):
        self.point = point
        self._trainers: dict = {}  # (which rows, settings) -> (the sample it serves, its engine)

    def trainer(self, what: str, sampled: list[int], settings):
        """An engine over the sampled units' (or clients') rows, kept while the sample stays the same."""
        p = self.point
        key = (what, settings)
        if key not in self._trainers or self._trainers[key][0] != sampled:
            sets = p.train_sets if what == "units" else [c.train for c in p.clients]
            self._trainers[key] = (list(sampled), make_trainer(p.cfg.engine, p.adapter, ClientSets([sets[i] for i in sampled]),
                                                               p.text, p.cache.logit_scale, settings))
        return self._trainers[key][1]

    def local_training(self, federation: Federation, round_, sampled: list[int], what: str = "units") -> LocalTraining:
        """The sampled units' (or, what="clients", clients') local training in this round."""
        p = self.point
        names = federation.units if what == "units" else [c.name for c in federation.clients]
        sets = p.train_sets if what == "units" else [c.train for c in p.clients]
        sizes = [len(sets[i]) for i in sampled]
        weights = None if p.server.reads_each_client else strategy.client_weights(sizes, p.server.aggregation).tolist()
        return LocalTraining([(int(p.cfg.seed), names[i]) for i in sampled], sizes, round_, int(p.cfg.local_epochs),
                             p.settings, lambda settings: self.trainer(what, sampled, settings), weights,
                             budget=privacy.budget(p.cfg, p.method, "train" if what == "units" else "deploy"),
                             rows=[sets[i] for i in sampled])

    def train(self, federation: Federation, round_: int, sampled: list[int]) -> Update:
        personal = federation.personal_of(sampled)
        update = federation.method.local_update(self.local_training(federation, round_, sampled),
                                                federation.global_state, personal)
        federation.store_personal(sampled, personal)
        return update

    def evaluate(self, federation: Federation, parts: set) -> dict:
        """Accuracies in fp32 whatever the training precision (bf16 would flip some predictions)."""
        p, out, fed = self.point, {}, federation
        if parts & {"val", "test"}:
            every = list(range(len(p.clients)))
            states = fed.method.deployed(self.local_training(fed, fed.current_round, every, "clients"),
                                         fed.global_state, fed.personal)
            for part in ("val", "test"):
                if part in parts:
                    out[part] = dict(zip([c.name for c in p.clients], accuracies(
                        p.adapter, states, [getattr(c, part) for c in p.clients], p.text, p.cache.logit_scale)))
        if "target" in parts:
            models = fed.method.target_models(fed.global_state, fed.personal)
            out["target"] = accuracies(p.adapter, models, [p.target_set] * len(models), p.text, p.cache.logit_scale)
        return out


def finetune(point: Point, best: dict) -> dict[str, float]:
    """Each client fine-tunes the model it deploys at the selected round on its own training split for
    `finetune_epochs`; its test accuracy after (paper Fig. 3c)."""
    cfg, clients, fed = point.cfg, point.clients, point.federation
    settings = capped_batch(replace(privacy.train_settings(point.method.train_settings(cfg), fed), mu=0.0),
                            max(len(c.train) for c in clients))
    trainer = make_trainer(cfg.engine, point.adapter, ClientSets([c.train for c in clients]), point.text,
                           point.cache.logit_scale, settings)
    train = LocalTraining([(int(cfg.seed), c.name) for c in clients], [len(c.train) for c in clients], "finetune",
                          int(cfg.finetune_epochs), settings, lambda s: trainer,
                          budget=privacy.budget(cfg, point.method, "deploy"), rows=[c.train for c in clients])
    states = fed.method.deployed(train, best["shared"], best["personal"])
    stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}
    trainer.train(stacked, train.epochs, train.generators())
    test = accuracies(point.adapter, [pick(stacked, i) for i in range(len(clients))], [c.test for c in clients],
                      point.text, point.cache.logit_scale)
    log.info("after %d fine-tuning epochs: personalization %s", cfg.finetune_epochs,
             ", ".join(f"{c.name} {100 * a:.2f}%" for c, a in zip(clients, test)))
    return {c.name: a for c, a in zip(clients, test)}
