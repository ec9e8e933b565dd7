"""`run(cfg, output_dir)`: one federated experiment on cached embeddings (conf/federate.yaml).

1. load the cache and check the settings;  2. split every participating domain 60/20/20;
3. put the clients' data on the device;  4. run the rounds (local training, aggregation, validation,
model selection);  5. optionally fine-tune locally;  6. write summary.json, history.jsonl, splits.json and
adapter.safetensors. The Flower runner (federate/flower_app.py) reuses the pieces marked "shared".
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict
from safetensors.torch import save_file

from . import strategy
from .adapter import init_adapters, num_parameters
from .cache import EmbeddingCache, default_cache_path, load_cache
from .engine import ENGINES, ClientSets, TrainSettings, client_generator, make_trainer
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


def target_and_participants(domains, target: str | None, path) -> tuple[str, list[str]]:
    """Shared. Leave-one-domain-out: the target (default: the first domain) never trains."""
    target = target or domains[0]
    if target not in domains:
        raise ConfigError(f"target_domain {target!r} is not in {path}; its domains: {', '.join(domains)}")
    participants = [d for d in domains if d != target]
    if not participants:
        raise ConfigError(f"{path} has only the domain {target}: leave-one-domain-out needs two or more")
    return target, participants


@dataclass
class Client:
    name: str
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]

    def sizes(self) -> dict[str, int]:
        return {p: len(getattr(self, p)[1]) for p in ("train", "val", "test")}


def client_splits(cache: EmbeddingCache, domains: list[str], seed: int, split_file: str | None) -> dict:
    """Shared. Row indices of train/val/test per domain: from the seed, or a published splits.json."""
    ids_of = {d: cache.domains[d].ids for d in domains}
    if split_file:
        return read_split_file(split_file, ids_of, domains)
    return {d: split_indices(len(ids_of[d]), seed, d) for d in domains}


def make_client(cache: EmbeddingCache, domain: str, split: dict, device) -> Client:
    """Shared. One participating domain's splits on the device."""
    x, y = domain_tensors(cache, domain, device)
    parts = [torch.from_numpy(split[p]).to(device) for p in ("train", "val", "test")]
    client = Client(domain, *((x[i], y[i]) for i in parts))
    if len(client.train[1]) < 2:
        raise ConfigError(f"domain {domain} has {len(client.train[1])} training rows; it needs at least 2")
    return client


def domain_tensors(cache: EmbeddingCache, domain: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    d = cache.domains[domain]
    return torch.from_numpy(d.features).to(device), torch.from_numpy(d.labels).to(device)


def class_text(cache: EmbeddingCache, device) -> torch.Tensor:
    """Shared. Raw class prompt embeddings [C, D], averaged over templates."""
    return torch.from_numpy(cache.text.mean(0)).to(device)


def train_settings(cfg) -> TrainSettings:
    mu = float(cfg.method.get("mu", 0.0)) if cfg.method.name == "fedprox" else 0.0
    return TrainSettings(lr=float(cfg.lr), batch_size=int(cfg.batch_size), loss=cfg.loss, mu=mu)


def cost_figures(method: str, adapter_params: int, clients: int, clip_params: int, rounds: int) -> dict:
    """Shared. What crosses the wire (float32 weights), against FedAvg fine-tuning the whole CLIP."""
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


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


class RunLog:
    """Shared. Model selection by mean validation accuracy, and history.jsonl written as the run goes
    (a run stopped early keeps every finished round)."""

    def __init__(self, output_dir: Path):
        self.file = open(output_dir / "history.jsonl", "w")
        self.best = {"round": 0, "val": -math.inf, "val_acc": {}, "test_acc": {}, "target": math.nan, "states": []}

    def improves(self, val_acc: dict[str, float]) -> bool:
        return mean(val_acc.values()) > self.best["val"]

    def record_best(self, round_: int, val_acc: dict, test_acc: dict, target: float, states: list) -> None:
        self.best = {"round": round_, "val": mean(val_acc.values()), "val_acc": dict(val_acc),
                     "test_acc": dict(test_acc), "target": target,
                     "states": [{k: v.detach().clone() for k, v in s.items()} for s in states]}

    def end_round(self, row: dict, rounds: int) -> None:
        """Append the round to history.jsonl and log it."""
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        log.info("round %d/%d  val %s  mean %.4f%s", row["round"], rounds,
                 " ".join(f"{n} {a:.4f}" for n, a in row["val_acc"].items()), row["val_mean"],
                 f"  * best: target {self.best['target']:.4f}" if row.get("improved") else "")

    def close(self) -> None:
        self.file.close()


def summarize(cfg, method: str, dataset: str, model: str, target: str, best: dict, cost: dict,
              split_sizes: dict, target_size: int) -> dict:
    """Shared. summary.json's fields (DESIGN.md section 5)."""
    names = list(split_sizes)
    return {
        "method": method, "dataset": dataset, "model": model, "target_domain": target, "participants": names,
        "seed": int(cfg.seed), "lr": float(cfg.lr), "rounds": int(cfg.rounds),
        "local_epochs": int(cfg.local_epochs), "batch_size": int(cfg.batch_size),
        "aggregation": cfg.aggregation, "loss": cfg.loss, "text_adapter": bool(cfg.text_adapter),
        "mu": float(cfg.method.get("mu", 0.0)), "engine": cfg.engine,
        "best_round": best["round"], "val_mean": best["val"], "val_acc": best["val_acc"],
        "generalization": best["target"], "personalization": best["test_acc"],
        "personalization_mean": mean(best["test_acc"].values()),
        "overall": mean([best["target"], *best["test_acc"].values()]),
        **cost, "split_sizes": split_sizes, "target_size": target_size,
    }


def finish(output_dir: Path, summary: dict, cfg, start: float) -> dict:
    """Shared. Write summary.json and log the result and the cost."""
    summary["wall_seconds"] = time.time() - start
    summary["config"] = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("best round %d: generalization (%s) %.2f%%, personalization %s (mean %.2f%%), overall %.2f%%",
             summary["best_round"], summary["target_domain"], 100 * summary["generalization"],
             ", ".join(f"{k} {100 * v:.2f}%" for k, v in summary["personalization"].items()),
             100 * summary["personalization_mean"], 100 * summary["overall"])
    if summary["trainable_params"]:
        full, per_round = summary["fedavg_full_clip"], summary["bytes_per_round"]
        log.info("cost per round: %s parameters, %.2f MB up + %.2f MB down; FedAvg on the whole CLIP: %s "
                 "parameters (%.0fx), %.0f MB up + %.0f MB down", f"{summary['trainable_params']:,}",
                 per_round["up"] / 1e6, per_round["down"] / 1e6, f"{full['trainable_params']:,}",
                 full["param_ratio"] or 0, full["bytes_per_round"]["up"] / 1e6, full["bytes_per_round"]["down"] / 1e6)
    log.info("wrote %s (%.1f s)", output_dir / "summary.json", summary["wall_seconds"])
    return summary


def save_adapters(path: Path, method: str, names: list[str], best: dict, dataset: str, model: str,
                  embed_dim: int, target: str, cfg) -> None:
    """Shared. The adapter(s) of the selected round in nn.Sequential layout (`image.0.weight`, ...); the
    local method saves one adapter per client (`<domain>/image.0.weight`, ...)."""
    states = best["states"]
    if method == "local":
        tensors = {f"{n}/{k}": v[0].contiguous().cpu() for n, s in zip(names, states) for k, v in s.items()}
    else:
        tensors = {k: v[0].contiguous().cpu() for k, v in states[0].items()}
    config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    metadata = {"method": method, "model": model, "dataset": dataset, "target_domain": target,
                "round": str(best["round"]), "embed_dim": str(embed_dim), "config": json.dumps(config)}
    save_file(tensors, str(path), metadata=metadata)


def run(cfg, output_dir: str | Path) -> dict:
    start = time.time()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_settings(cfg)
    if cfg.get("backend", "local") == "flower":  # the same experiment through Flower's simulation engine
        from .flower_app import run_simulation

        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.cache_file = str(cache_path(cfg))
        return run_simulation(cfg, output_dir)
    if cfg.get("backend", "local") != "local":
        raise ConfigError(f"backend must be local or flower, not {cfg.backend!r}")
    device = resolve_device(cfg.device)
    torch.set_flush_denormal(True)  # softmax over 512 dims makes tiny gradients; denormals are 10x slower
    method = cfg.method.name

    # 1. the cache
    cache = load_cache(cache_path(cfg), cfg.model.name)
    target, participants = target_and_participants(list(cache.domains), cfg.target_domain, cache.path)

    # 2. splits
    splits = client_splits(cache, participants, int(cfg.seed), cfg.split_file)
    ids_of = {d: cache.domains[d].ids for d in participants}
    (output_dir / "splits.json").write_text(json.dumps(splits_to_ids(splits, ids_of)))

    # 3. data on the device, largest training split first (the batched engine's order)
    clients = sorted((make_client(cache, d, splits[d], device) for d in participants), key=lambda c: -len(c.train[1]))
    names = [c.name for c in clients]
    target_set = domain_tensors(cache, target, device)
    text = class_text(cache, device)
    towers = ("image", "text") if cfg.text_adapter else ("image",)
    global_state = {k: v.to(device) for k, v in init_adapters(cache.embed_dim, int(cfg.seed), towers).items()}
    trainable = 0 if method == "zeroshot" else num_parameters(global_state)
    cost = cost_figures(method, trainable, len(clients), cache.model_num_parameters, int(cfg.rounds))
    log.info("%s on %s: target %s, clients %s (train rows %s), %s trainable parameters", method,
             cache.dataset_name, target, ", ".join(names), [len(c.train[1]) for c in clients], f"{trainable:,}")

    # 4. rounds
    runlog = RunLog(output_dir)
    try:
        if method == "zeroshot":
            evaluate_round(runlog, 0, 0, [None] * len(clients), [None], clients, target_set, text, {})
        else:
            federate(cfg, method, clients, global_state, target_set, text, cache.logit_scale, runlog)
    finally:
        runlog.close()
    best = runlog.best
    summary = summarize(cfg, method, cache.dataset_name, cache.model_name, target, best, cost,
                        {c.name: c.sizes() for c in clients}, len(target_set[1]))

    # 5. local fine-tuning of the selected global adapter (paper Fig. 3c)
    if int(cfg.finetune_epochs) and method != "zeroshot":
        summary["personalization_finetuned"] = finetune(cfg, clients, best["states"][0], text, cache.logit_scale)
        summary["personalization_finetuned_mean"] = mean(summary["personalization_finetuned"].values())

    # 6. outputs
    if method != "zeroshot":
        save_adapters(output_dir / "adapter.safetensors", method, names, best, cache.dataset_name,
                      cache.model_name, cache.embed_dim, target, cfg)
    return finish(output_dir, summary, cfg, start)


def evaluate_round(runlog: RunLog, round_: int, rounds: int, client_states: list, target_states: list,
                   clients: list[Client], target_set, text, row: dict) -> None:
    """Validate every participant; on a new best mean, record test and target accuracies and keep the
    adapters (each client's for `local`, else the global one)."""
    val_acc = dict(zip([c.name for c in clients], accuracies(client_states, [c.val for c in clients], text)))
    row.update(round=round_, val_acc=val_acc, val_mean=mean(val_acc.values()))
    if runlog.improves(val_acc):
        test = dict(zip(val_acc, accuracies(client_states, [c.test for c in clients], text)))
        target = mean(accuracies(target_states, [target_set] * len(target_states), text))
        runlog.record_best(round_, val_acc, test, target, [s for s in target_states if s is not None])
        row.update(test_acc=test, target_acc=target, improved=True)
    runlog.end_round(row, rounds)


def federate(cfg, method, clients, global_state, target_set, text, scale, runlog: RunLog) -> None:
    if method == "central":  # one adapter on the pooled training rows of all participants
        train_sets = [(torch.cat([c.train[0] for c in clients]), torch.cat([c.train[1] for c in clients]))]
        train_names = ["pooled"]
    else:
        train_sets, train_names = [c.train for c in clients], [c.name for c in clients]
    settings = train_settings(cfg)
    trainer = make_trainer(cfg.engine, ClientSets(*zip(*train_sets)), text, scale, settings)
    stacked = strategy.stack(global_state, len(train_sets))
    weights = strategy.client_weights([len(y) for _, y in train_sets], cfg.aggregation)
    for r in range(1, int(cfg.rounds) + 1):
        generators = [client_generator(int(cfg.seed), n, r) for n in train_names]
        losses = trainer.train(stacked, int(cfg.local_epochs), generators, anchor=global_state if settings.mu else None)
        if method in FEDERATED:
            global_state = strategy.aggregate_train(stacked, weights)
            strategy.configure_train(stacked, global_state)
        if method == "local":
            client_states = [pick(stacked, i) for i in range(len(clients))]
            target_states = client_states  # no global model: the mean of the clients' own adapters
        else:
            shared = pick(stacked, 0)  # after aggregation (or with one pooled client) all are equal
            client_states, target_states = [shared] * len(clients), [shared]
        row = {"train_loss": dict(zip(train_names, losses.tolist()))}
        evaluate_round(runlog, r, int(cfg.rounds), client_states, target_states, clients, target_set, text, row)


def finetune(cfg, clients, selected, text, scale) -> dict[str, float]:
    """Each participant fine-tunes the selected adapter on its own training split; test accuracy after."""
    settings = TrainSettings(lr=float(cfg.lr), batch_size=int(cfg.batch_size), loss=cfg.loss)
    trainer = make_trainer(cfg.engine, ClientSets([c.train[0] for c in clients], [c.train[1] for c in clients]),
                           text, scale, settings)
    stacked = {k: v.expand(len(clients), *v.shape[1:]).clone() for k, v in selected.items()}
    trainer.train(stacked, int(cfg.finetune_epochs), [client_generator(int(cfg.seed), c.name, "finetune") for c in clients])
    test = accuracies([pick(stacked, i) for i in range(len(clients))], [c.test for c in clients], text)
    log.info("after %d fine-tuning epochs: personalization %s", cfg.finetune_epochs,
             ", ".join(f"{c.name} {100 * a:.2f}%" for c, a in zip(clients, test)))
    return {c.name: a for c, a in zip(clients, test)}
