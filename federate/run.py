"""`run(cfg, output_dir)`: one federated experiment on cached embeddings (conf/federate.yaml).

1. load the cache and check the settings;  2. split every participating domain 60/20/20;
3. put the clients' data on the device;  4. run the rounds (local training, aggregation, validation,
model selection);  5. optionally fine-tune locally;  6. write summary.json, history.jsonl, splits.json and
adapter.safetensors.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from . import strategy
from .adapter import init_adapters, num_parameters
from .cache import EmbeddingCache, default_cache_path, load_cache
from .engine import ENGINES, ClientSets, TrainSettings, make_trainer
from .errors import ConfigError
from .evaluate import accuracies, pick
from .losses import LOSSES
from .splits import read_split_file, split_indices, splits_to_ids

log = logging.getLogger(__name__)

METHODS = ("fedclip", "fedprox", "local", "central", "zeroshot")
FEDERATED = ("fedclip", "fedprox")


def check_settings(cfg) -> None:
    m = cfg.method
    problems = [
        (m.name not in METHODS, f"method must be one of {', '.join(METHODS)}, not {m.name!r}"),
        (not float(cfg.lr) > 0, f"lr must be > 0, not {cfg.lr}"),
        (int(cfg.rounds) < 1, f"rounds must be >= 1, not {cfg.rounds}"),
        (int(cfg.local_epochs) < 1, f"local_epochs must be >= 1, not {cfg.local_epochs}"),
        (int(cfg.batch_size) < 2, f"batch_size must be >= 2 (the contrastive loss needs pairs), not {cfg.batch_size}"),
        (int(cfg.finetune_epochs) < 0, f"finetune_epochs must be >= 0, not {cfg.finetune_epochs}"),
        (float(m.get("mu", 0.0)) < 0, f"method.mu must be >= 0, not {m.get('mu')}"),
        (cfg.aggregation not in strategy.AGGREGATIONS, f"aggregation must be uniform or samples, not {cfg.aggregation!r}"),
        (cfg.loss not in LOSSES, f"loss must be contrastive or ce, not {cfg.loss!r}"),
        (cfg.engine not in ("auto", *ENGINES), f"engine must be auto, {', '.join(ENGINES)}, not {cfg.engine!r}"),
        (cfg.device not in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, not {cfg.device!r}"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(message)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def cache_path(cfg) -> Path:
    if cfg.cache_file:
        return Path(cfg.cache_file)
    name = cfg.dataset.name
    if not name and not OmegaConf.is_missing(cfg.dataset, "root") and cfg.dataset.root:
        name = Path(cfg.dataset.root).resolve().name
    if not name:
        raise ConfigError("set dataset.name (or dataset.root) or cache_file to say which cache to read")
    return default_cache_path(cfg.cache_dir, name, cfg.model.name)


@dataclass
class Client:
    name: str
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def build_clients(cache: EmbeddingCache, participants: list[str], splits, device) -> list[Client]:
    """One client per participating domain, largest training split first (the batched engine's order)."""
    clients = []
    for d in participants:
        x = torch.from_numpy(cache.domains[d].features).to(device)
        y = torch.from_numpy(cache.domains[d].labels).to(device)
        part = {p: torch.from_numpy(splits[d][p]).to(device) for p in ("train", "val", "test")}
        clients.append(Client(d, *((x[i], y[i]) for i in (part["train"], part["val"], part["test"]))))
    return sorted(clients, key=lambda c: -len(c.train[1]))


def cost_figures(method: str, adapter_params: int, clients: int, clip_params: int, rounds: int) -> dict:
    """What crosses the wire (float32 weights), against FedAvg fine-tuning the whole CLIP."""
    per_client = 4 * adapter_params if method in FEDERATED else 0
    per_round = {"up": clients * per_client, "down": clients * per_client}
    full = {"up": clients * 4 * clip_params, "down": clients * 4 * clip_params}
    return {
        "trainable_params": adapter_params,
        "bytes_per_round": per_round,
        "bytes_total": {k: v * rounds for k, v in per_round.items()},
        "fedavg_full_clip": {
            "trainable_params": clip_params, "bytes_per_round": full,
            "param_ratio": clip_params / adapter_params if adapter_params else None,
        },
    }


def run(cfg, output_dir: str | Path) -> dict:
    start = time.time()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_settings(cfg)
    device = resolve_device(cfg.device)
    torch.set_flush_denormal(True)  # softmax over 512 dims makes tiny gradients; denormals are 10x slower
    method = cfg.method.name

    # 1. the cache
    cache = load_cache(cache_path(cfg), cfg.model.name)
    domains = list(cache.domains)
    target = cfg.target_domain or domains[0]
    if target not in cache.domains:
        raise ConfigError(f"target_domain {target!r} is not in {cache.path}; its domains: {', '.join(domains)}")
    participants = [d for d in domains if d != target]
    if not participants:
        raise ConfigError(f"{cache.path} has only the domain {target}: leave-one-domain-out needs two or more")

    # 2. splits
    ids_of = {d: cache.domains[d].ids for d in participants}
    if cfg.split_file:
        splits = read_split_file(cfg.split_file, ids_of, participants)
    else:
        splits = {d: split_indices(len(ids_of[d]), int(cfg.seed), d) for d in participants}
    (output_dir / "splits.json").write_text(json.dumps(splits_to_ids(splits, ids_of)))

    # 3. data on the device
    clients = build_clients(cache, participants, splits, device)
    for c in clients:
        if len(c.train[1]) < 2:
            raise ConfigError(f"domain {c.name} has {len(c.train[1])} training rows; it needs at least 2")
    names = [c.name for c in clients]
    target_set = tuple(torch.from_numpy(getattr(cache.domains[target], a)).to(device) for a in ("features", "labels"))
    text = torch.from_numpy(cache.text.mean(0)).to(device)  # [C, D]; templates averaged
    towers = ("image", "text") if cfg.text_adapter else ("image",)
    global_state = {k: v.to(device) for k, v in init_adapters(cache.embed_dim, int(cfg.seed), towers).items()}
    trainable = 0 if method == "zeroshot" else num_parameters(global_state)
    cost = cost_figures(method, trainable, len(clients), cache.model_num_parameters, int(cfg.rounds))
    log.info("%s on %s: target %s, clients %s (train rows %s), %s trainable parameters", method,
             cache.dataset_name, target, ", ".join(names), [len(c.train[1]) for c in clients], f"{trainable:,}")

    # 4. rounds
    history, best = [], {"round": 0, "val": -math.inf}
    if method == "zeroshot":
        best = select(0, -math.inf, None, [None] * len(clients), [None], clients, target_set, text)
        history.append({"round": 0, "val_acc": dict(zip(names, best["val_acc"])), "val_mean": best["val"],
                        "test_acc": best["test_acc"], "target_acc": best["target"]})
        final_states = None
    else:
        final_states, best, history = federate(cfg, method, clients, names, global_state, target_set, text,
                                               cache.logit_scale, device)

    summary = {
        "method": method, "dataset": cache.dataset_name, "model": cache.model_name, "target_domain": target,
        "participants": names, "seed": int(cfg.seed), "lr": float(cfg.lr), "rounds": int(cfg.rounds),
        "local_epochs": int(cfg.local_epochs), "batch_size": int(cfg.batch_size),
        "aggregation": cfg.aggregation, "loss": cfg.loss, "text_adapter": bool(cfg.text_adapter),
        "mu": float(cfg.method.get("mu", 0.0)), "engine": cfg.engine,
        "best_round": best["round"], "val_mean": best["val"], "val_acc": dict(zip(names, best["val_acc"])),
        "generalization": best["target"], "personalization": best["test_acc"],
        "personalization_mean": mean(best["test_acc"].values()),
        "overall": mean([best["target"], *best["test_acc"].values()]),
        **cost,
        "split_sizes": {c.name: {p: len(getattr(c, p)[1]) for p in ("train", "val", "test")} for c in clients},
        "target_size": len(target_set[1]),
    }

    # 5. local fine-tuning of the selected global adapter (paper Fig. 3c)
    if int(cfg.finetune_epochs) and method != "zeroshot":
        summary["personalization_finetuned"] = finetune(cfg, clients, best["states"][0], text, cache.logit_scale)
        summary["personalization_finetuned_mean"] = mean(summary["personalization_finetuned"].values())

    # 6. outputs
    with open(output_dir / "history.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    if final_states is not None:
        save_adapters(output_dir / "adapter.safetensors", method, names, best, cache, target, cfg)
    summary["wall_seconds"] = time.time() - start
    summary["config"] = OmegaConf.to_container(cfg, resolve=True)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("best round %d: generalization (%s) %.2f%%, personalization %s (mean %.2f%%), overall %.2f%%",
             best["round"], target, 100 * summary["generalization"],
             ", ".join(f"{k} {100 * v:.2f}%" for k, v in summary["personalization"].items()),
             100 * summary["personalization_mean"], 100 * summary["overall"])
    if trainable:
        full = cost["fedavg_full_clip"]
        log.info("cost per round: %s parameters, %.2f MB up + %.2f MB down; FedAvg on the whole CLIP: %s "
                 "parameters (%.0fx), %.0f MB up + %.0f MB down", f"{trainable:,}",
                 cost["bytes_per_round"]["up"] / 1e6, cost["bytes_per_round"]["down"] / 1e6,
                 f"{full['trainable_params']:,}", full["param_ratio"] or 0,
                 full["bytes_per_round"]["up"] / 1e6, full["bytes_per_round"]["down"] / 1e6)
    log.info("wrote %s (%.1f s)", output_dir / "summary.json", summary["wall_seconds"])
    return summary


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def select(round_, best_val, val_acc, client_states, target_states, clients, target_set, text) -> dict:
    """Record the test accuracies of a round whose mean validation accuracy is the best so far."""
    if val_acc is None:
        val_acc = accuracies(client_states, [c.val for c in clients], text)
    test = accuracies(client_states, [c.test for c in clients], text)
    target = mean(accuracies(target_states, [target_set] * len(target_states), text))
    return {"round": round_, "val": mean(val_acc), "val_acc": val_acc,
            "test_acc": {c.name: a for c, a in zip(clients, test)}, "target": target}


def federate(cfg, method, clients, names, global_state, target_set, text, scale, device):
    settings = TrainSettings(lr=float(cfg.lr), batch_size=int(cfg.batch_size), loss=cfg.loss,
                             mu=float(cfg.method.get("mu", 0.0)) if method == "fedprox" else 0.0)
    if method == "central":  # one adapter on the pooled training rows of all participants
        train_sets = [(torch.cat([c.train[0] for c in clients]), torch.cat([c.train[1] for c in clients]))]
    else:
        train_sets = [c.train for c in clients]
    trainer = make_trainer(cfg.engine, ClientSets(*zip(*train_sets)), text, scale, settings)
    stacked = strategy.stack(global_state, len(train_sets))
    weights = strategy.client_weights([len(y) for _, y in train_sets], cfg.aggregation)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    history, best = [], {"round": 0, "val": -math.inf}
    for r in range(1, int(cfg.rounds) + 1):
        losses = trainer.train(stacked, int(cfg.local_epochs), generator,
                               anchor=global_state if settings.mu else None)
        if method in FEDERATED:
            global_state = strategy.aggregate_train(stacked, weights)
            strategy.configure_train(stacked, global_state)
        if method == "local":
            client_states = [pick(stacked, i) for i in range(len(clients))]
            target_states = client_states  # no global model: the mean of the clients' own adapters
        else:
            shared = pick(stacked, 0)  # after aggregation (or with one pooled client) all are equal
            client_states, target_states = [shared] * len(clients), [shared]
        val_acc = accuracies(client_states, [c.val for c in clients], text)
        row = {"round": r, "train_loss": dict(zip(names if len(train_sets) > 1 else ["pooled"], losses.tolist())),
               "val_acc": dict(zip(names, val_acc)), "val_mean": mean(val_acc)}
        if mean(val_acc) > best["val"]:
            best = select(r, best["val"], val_acc, client_states, target_states, clients, target_set, text)
            best["states"] = [{k: v.clone() for k, v in s.items()} for s in
                              (client_states if method == "local" else [client_states[0]])]
            row.update(test_acc=best["test_acc"], target_acc=best["target"], improved=True)
        history.append(row)
        log.info("round %d/%d  val %s  mean %.4f%s", r, cfg.rounds,
                 " ".join(f"{n} {a:.4f}" for n, a in zip(names, val_acc)), mean(val_acc),
                 f"  * best: target {best['target']:.4f}" if row.get("improved") else "")
    return stacked, best, history


def finetune(cfg, clients, selected, text, scale) -> dict[str, float]:
    """Each participant fine-tunes the selected adapter on its own training split; test accuracy after."""
    settings = TrainSettings(lr=float(cfg.lr), batch_size=int(cfg.batch_size), loss=cfg.loss)
    trainer = make_trainer(cfg.engine, ClientSets([c.train[0] for c in clients], [c.train[1] for c in clients]),
                           text, scale, settings)
    stacked = {k: v.expand(len(clients), *v.shape[1:]).clone() for k, v in selected.items()}
    trainer.train(stacked, int(cfg.finetune_epochs), torch.Generator().manual_seed(int(cfg.seed) + 1))
    test = accuracies([pick(stacked, i) for i in range(len(clients))], [c.test for c in clients], text)
    log.info("after %d fine-tuning epochs: personalization %s", cfg.finetune_epochs,
             ", ".join(f"{c.name} {100 * a:.2f}%" for c, a in zip(clients, test)))
    return {c.name: a for c, a in zip(clients, test)}


def save_adapters(path: Path, method: str, names: list[str], best: dict, cache, target: str, cfg) -> None:
    """The adapter(s) of the selected round in nn.Sequential layout (`image.0.weight`, ...); the local
    method saves one adapter per client (`<domain>/image.0.weight`, ...)."""
    states = best["states"]
    if method == "local":
        tensors = {f"{n}/{k}": v[0].contiguous().cpu() for n, s in zip(names, states) for k, v in s.items()}
    else:
        tensors = {k: v[0].contiguous().cpu() for k, v in states[0].items()}
    metadata = {"method": method, "model": cache.model_name, "dataset": cache.dataset_name,
                "target_domain": target, "round": str(best["round"]), "embed_dim": str(cache.embed_dim),
                "config": json.dumps(OmegaConf.to_container(cfg, resolve=True))}
    save_file(tensors, str(path), metadata=metadata)
