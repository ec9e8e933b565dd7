"""One federated experiment on cached embeddings, the pieces both runners share (the in-process runner,
federate/run.py, and the Flower apps, federate/flower/): settings, the cache and the clients' data, cost
figures, model selection, and the outputs (summary.json, history.jsonl, adapter.safetensors).
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from . import methods
from .adapters import Adapter
from .cache import EmbeddingCache, canonical_domain, default_cache_path
from .engine import ENGINES, TrainSettings
from .errors import ConfigError
from .evaluate import accuracies
from .losses import LOSSES
from .methods import Method
from .splits import check_split_sizes

log = logging.getLogger("federate")
round_log = logging.getLogger("federate.rounds")  # one line per round: the run's log file (and a non-TTY)


def check_settings(cfg) -> Method:
    """The method of `cfg`, once its settings make sense (types are checked by the config schema)."""
    method = methods.get(cfg.method.name)
    optimizer = (cfg.get("optimizer") or {}).get("name", "adam_l2")  # the backbone methods' (backbone/optim.py)
    problems = [
        (not (math.isfinite(cfg.lr) and cfg.lr > 0), f"lr must be > 0 and finite, not {cfg.lr}"),
        (cfg.rounds < 1, f"rounds must be >= 1, not {cfg.rounds}"),
        (cfg.local_epochs < 1, f"local_epochs must be >= 1, not {cfg.local_epochs}"),
        (cfg.batch_size < 2, f"batch_size must be >= 2 (the contrastive loss needs pairs), not {cfg.batch_size}"),
        (cfg.finetune_epochs < 0, f"finetune_epochs must be >= 0, not {cfg.finetune_epochs}"),
        (not (math.isfinite(float(cfg.method.get("mu", 0.0))) and float(cfg.method.get("mu", 0.0)) >= 0),
         f"method.mu must be >= 0 and finite, not {cfg.method.get('mu')}"),
        (not 0 <= cfg.seed < 2**63, f"seed must be an integer from 0 to 2^63 - 1, not {cfg.seed}"),
        (cfg.flower.min_clients < 1, f"flower.min_clients must be >= 1, not {cfg.flower.min_clients}"),
        (not (math.isfinite(cfg.flower.round_timeout) and cfg.flower.round_timeout > 0),
         f"flower.round_timeout must be > 0 seconds and finite, not {cfg.flower.round_timeout}"),
        (not (math.isfinite(cfg.flower.startup_timeout) and cfg.flower.startup_timeout > 0),
         f"flower.startup_timeout must be > 0 seconds and finite, not {cfg.flower.startup_timeout}"),
        (cfg.loss not in LOSSES, f"loss must be contrastive or ce, not {cfg.loss!r}"),
        (cfg.engine not in ("auto", *ENGINES), f"engine must be auto, {', '.join(ENGINES)}, not {cfg.engine!r}"),
        (cfg.get("precision", "fp32") not in ("fp32", "bf16"),
         f"precision must be fp32 or bf16, not {cfg.get('precision')!r}"),
        (cfg.device not in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, not {cfg.device!r}"),
        (not method.images and optimizer != "adam_l2",
         f"optimizer={optimizer} is for the methods that train the backbone (fedavg_full, fedprox_full, "
         f"fedclip_full; backbone=alexnet picks optimizer=sgd); method={method.name} trains its adapter with "
         "FedCLIP's Adam (optimizer=adam_l2)"),
        (cfg.backend not in ("local", "flower"), f"backend must be local or flower, not {cfg.backend!r}"),
        (cfg.backend == "flower" and not method.flower,
         f"backend=flower runs the methods {', '.join(m.name for m in methods.METHODS.values() if m.flower)}, "
         f"not {method.name}"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(message)
    return method


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
    """Leave-one-domain-out: the target (default: the first domain) never trains. Domain names are
    canonical ("Real World" and "Real_World" are one domain)."""
    target = canonical_domain(target) if target else domains[0]
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


def make_client(cache: EmbeddingCache, split, device) -> Client:
    """One client's splits (a federate.partition.ClientSplit) on the device."""
    x, y = domain_tensors(cache, split.domain, device)
    parts = [torch.from_numpy(split.rows[p]).to(device) for p in ("train", "val", "test")]
    client = Client(split.name, *((x[i], y[i]) for i in parts))
    check_split_sizes(split.name, client.sizes())  # an empty split would read as 0.00% accuracy
    return client


def domain_tensors(cache: EmbeddingCache, domain: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    d = cache.domains[domain]
    return torch.from_numpy(d.features).to(device), torch.from_numpy(d.labels).to(device)


def class_text(cache: EmbeddingCache, device) -> torch.Tensor:
    """Raw class prompt embeddings [C, D], averaged over templates."""
    return torch.from_numpy(cache.text.mean(0)).to(device)


def train_settings(cfg, method: Method) -> TrainSettings:
    mu = float(cfg.method.get("mu", 0.0)) if method.proximal else 0.0
    return TrainSettings(lr=float(cfg.lr), batch_size=int(cfg.batch_size), loss=cfg.loss, mu=mu,
                         precision=cfg.get("precision", "fp32"))


def cost_figures(method: Method, adapter_params: int, clients: int, clip_params: int, rounds: int,
                 sent_bytes: int | None = None) -> dict:
    """What crosses the wire, against FedAvg fine-tuning the whole CLIP: `sent_bytes` per client and
    direction (default: the trainable parameters as float32), when the method communicates."""
    per_client = (4 * adapter_params if sent_bytes is None else sent_bytes) if method.aggregates else 0
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


def check_finite(round_: int, losses: dict[str, float], state: dict[str, torch.Tensor], lr: float) -> None:
    """A run whose losses or weights are no longer finite, or whose weights exploded, has diverged: stop,
    never report its numbers (exploded weights saturate the adapter: accuracy falls to chance)."""
    exploded = 100.0  # root mean square of a weight tensor: trained weights stay near 1 or below; lr=1e3 gives ~500
    bad = [n for n, v in losses.items() if not math.isfinite(v)]
    if not bad and bool(torch.stack([torch.isfinite(v).all() for v in state.values()]).all()):
        rms = max((float(torch.linalg.vector_norm(v.float())) / v.numel() ** 0.5 for v in state.values()
                   if v.is_floating_point() and v.numel()), default=0.0)
        if rms <= exploded:
            return
        bad_weights = f"exploding weights: root mean square {rms:.3g} > {exploded:g}"
    else:
        bad_weights = "non-finite adapter weights"
    what = f"non-finite training loss for {', '.join(bad)}" if bad else bad_weights
    raise ConfigError(f"round {round_}: training diverged ({what}); no summary was written. Lower lr (now {lr})")


class RunLog:
    """Model selection by mean validation accuracy, and history.jsonl written as the run goes (a run
    stopped early keeps every finished round). A run directory holds one run: another run's outputs
    there are never overwritten."""

    def __init__(self, output_dir: Path, rounds: int, progress: bool = True):
        for name in ("summary.json", "history.jsonl"):
            if (output_dir / name).exists():
                raise ConfigError(f"{output_dir} already holds a run ({name}); give this run its own folder "
                                  "(hydra.run.dir=...) or move the old one away")
        self.file = open(output_dir / "history.jsonl", "x")
        self.best = {"round": 0, "val": -math.inf, "val_acc": {}, "test_acc": {}, "target": math.nan, "states": []}
        self.bar = progress_bar(rounds) if progress else None

    def improves(self, val_acc: dict[str, float]) -> bool:
        return mean(val_acc.values()) > self.best["val"]

    def record_best(self, round_: int, val_acc: dict, test_acc: dict, target: float, states: list) -> None:
        self.best = {"round": round_, "val": mean(val_acc.values()), "val_acc": dict(val_acc),
                     "test_acc": dict(test_acc), "target": target,
                     "states": [{k: v.detach().clone() for k, v in s.items()} for s in states]}

    def end_round(self, row: dict, rounds: int) -> None:
        """Append the round to history.jsonl, log it and move the progress bar."""
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        round_log.info("round %d/%d  val %s  mean %.4f%s", row["round"], rounds,
                       " ".join(f"{n} {a:.4f}" for n, a in row["val_acc"].items()), row["val_mean"],
                       f"  * best: target {self.best['target']:.4f}" if row.get("improved") else "")
        if self.bar is not None:
            self.bar.set_postfix_str(f"val {row['val_mean']:.4f}  best target {self.best['target']:.4f} "
                                     f"(round {self.best['round']})", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.file.close()
        if self.bar is not None:
            self.bar.close()


def progress_bar(rounds: int):
    """A bar over the rounds on an interactive terminal (the per-round lines then go to the log file only)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=rounds, unit="round", desc="rounds", dynamic_ncols=True, leave=True)


class HideRoundsOnTerminal:
    """Logging filter for the console handler (conf/federate.yaml): the progress bar replaces the
    per-round lines on an interactive terminal; the log file keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == round_log.name and sys.stderr.isatty())


def summarize(cfg, method: Method, dataset: str, model: str, target: str, best: dict, cost: dict,
              split_sizes: dict, target_size: int, adapter: Adapter | None, strategy) -> dict:
    """summary.json's fields."""
    names = list(split_sizes)
    return {
        "method": method.name, "dataset": dataset, "model": model, "target_domain": target, "participants": names,
        "seed": int(cfg.seed), "lr": float(cfg.lr), "rounds": int(cfg.rounds),
        "local_epochs": int(cfg.local_epochs), "batch_size": int(cfg.batch_size),
        "aggregation": cfg.aggregation, "loss": cfg.loss, "text_adapter": bool(cfg.text_adapter),
        "mu": float(cfg.method.get("mu", 0.0)), "engine": cfg.engine,
        "precision": cfg.get("precision", "fp32"),
        "adapter": adapter.describe() if adapter is not None and method.trains != "none" else None,
        "strategy": strategy.describe() if strategy is not None and method.aggregates else None,
        "best_round": best["round"], "val_mean": best["val"], "val_acc": best["val_acc"],
        "generalization": best["target"], "personalization": best["test_acc"],
        "personalization_mean": mean(best["test_acc"].values()),
        "overall": mean([best["target"], *best["test_acc"].values()]),
        **cost, "split_sizes": split_sizes, "target_size": target_size,
    }


def finish(output_dir: Path, summary: dict, cfg, start: float) -> dict:
    """Write summary.json and log the result and the cost."""
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


def save_adapters(path: Path, method: Method, names: list[str], best: dict, dataset: str, model: str,
                  embed_dim: int, target: str, cfg) -> None:
    """The adapter(s) of the selected round (`image.0.weight`, ... for AttAI); a method with personal
    adapters saves one per client (`<domain>/image.0.weight`, ...)."""
    states = best["states"]
    if method.personal:
        tensors = {f"{n}/{k}": v.contiguous().cpu() for n, s in zip(names, states) for k, v in s.items()}
    else:
        tensors = {k: v.contiguous().cpu() for k, v in states[0].items()}
    config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    metadata = {"method": method.name, "model": model, "dataset": dataset, "target_domain": target,
                "round": str(best["round"]), "embed_dim": str(embed_dim), "config": json.dumps(config)}
    save_file(tensors, str(path), metadata=metadata)


def evaluate_round(runlog: RunLog, adapter: Adapter, scale: float, round_: int, rounds: int, client_states: list,
                   target_states: list, clients: list[Client], target_set, text, row: dict) -> None:
    """Validate every participant; on a new best mean, record test and target accuracies and keep the
    adapters that were evaluated on the target."""
    val_acc = dict(zip([c.name for c in clients],
                       accuracies(adapter, client_states, [c.val for c in clients], text, scale)))
    row.update(round=round_, val_acc=val_acc, val_mean=mean(val_acc.values()))
    if runlog.improves(val_acc):
        test = dict(zip(val_acc, accuracies(adapter, client_states, [c.test for c in clients], text, scale)))
        target = mean(accuracies(adapter, target_states, [target_set] * len(target_states), text, scale))
        runlog.record_best(round_, val_acc, test, target, target_states)
        row.update(test_acc=test, target_acc=target, improved=True)
    runlog.end_round(row, rounds)
