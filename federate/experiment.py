"""One federated experiment on cached embeddings, the pieces both runners share (the in-process runner,
federate/run.py, and the Flower apps, federate/flower/): settings, the cache and the clients' data, cost
figures, model selection, and the outputs (summary.json, history.jsonl, adapter.safetensors).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from extract.files import atomic_path, no_follow, no_link, write_text

from . import methods
from .adapters import Adapter
from .cache import REBUILD, EmbeddingCache, canonical_domain, case_hint, default_cache_path, derived, load_cache
from .engine import ENGINES, TrainSettings
from .errors import ConfigError
from .losses import LOSSES
from .methods import Method
from .rows import Rows
from .splits import check_split_sizes

log = logging.getLogger("federate")
round_log = logging.getLogger("federate.rounds")  # one line per round: the run's log file (and a non-TTY)


def check_settings(cfg) -> Method:
    """The method of `cfg` (federate/methods/), once its settings make sense (types are checked by the
    config schema; the method checks what it cannot run with)."""
    method = methods.build(cfg.method)
    problems = [
        (not (math.isfinite(cfg.lr) and cfg.lr > 0), f"lr must be > 0 and finite, not {cfg.lr}"),
        (cfg.rounds < 1, f"rounds must be >= 1, not {cfg.rounds}"),
        (cfg.local_epochs < 1, f"local_epochs must be >= 1, not {cfg.local_epochs}"),
        (cfg.batch_size < 2, f"batch_size must be >= 2 (the contrastive loss needs pairs), not {cfg.batch_size}"),
        (cfg.finetune_epochs < 0, f"finetune_epochs must be >= 0, not {cfg.finetune_epochs}"),
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
        (cfg.backend not in ("local", "flower"), f"backend must be local or flower, not {cfg.backend!r}"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(message)
    method.check(cfg)
    return method


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def cache_path(cfg) -> Path:
    if cfg.cache_file and str(cfg.cache_file).startswith(HUB_URI):
        return hub_cache(str(cfg.cache_file), cfg.cache_dir)
    if cfg.cache_file:
        return Path(cfg.cache_file)
    name = cfg.dataset.name
    if not name and not OmegaConf.is_missing(cfg.dataset, "root") and cfg.dataset.root:
        name = Path(cfg.dataset.root).resolve().name
    if not name:
        raise ConfigError("set dataset.name (or dataset.root) or cache_file to say which cache to read")
    return default_cache_path(cfg.cache_dir, name, cfg.model.name)


HUB_URI = "hf://"
HUB_CACHES: dict[str, dict] = {}  # a pulled cache's resolved path -> its repo and commit (summary.json records them)


def hub_cache(uri: str, cache_dir: str) -> Path:
    """`cache_file=hf://<repo_id>@<revision>`: the verified local copy of that revision under
    `<cache_dir>/hub/`, pulled on first use (extract/hub/remote.py, docs/sharing.md)."""
    from extract.errors import ExtractError
    from extract.hub.remote import local_cache

    try:
        pulled = local_cache(uri, cache_dir)
    except ExtractError as e:
        raise ConfigError(str(e)) from None
    again = f"python -m extract.hub pull {pulled.repo_id}@{pulled.commit} cache_dir={cache_dir} overwrite=true"
    try:  # verified here, so that a damaged local copy asks for a fresh pull (the run's own load reuses this one)
        load_cache(pulled.path)
    except ConfigError as e:
        raise ConfigError(str(e).replace(REBUILD, again)) from None
    HUB_CACHES[str(pulled.path.resolve())] = pulled.source()
    return pulled.path


NO_TARGET = "none"  # target_domain=none: every domain takes part, no held-out domain (e.g. CIFAR split into clients)


def target_and_participants(domains, target: str | None, path) -> tuple[str | None, list[str]]:
    """Leave-one-domain-out: the target (default: the first domain) never trains. Domain names are
    canonical ("Real World" and "Real_World" are one domain). `target_domain=none`: no target."""
    if target == NO_TARGET:
        return None, list(domains)
    target = canonical_domain(target) if target else domains[0]
    if target not in domains:
        raise ConfigError(f"target_domain {target!r} is not in {path}; its domains: {', '.join(domains)}"
                          f"{case_hint(target, domains)}")
    participants = [d for d in domains if d != target]
    if not participants:
        raise ConfigError(f"{path} has only the domain {target}: leave-one-domain-out needs two or more")
    return target, participants


@dataclass
class Client:
    """One client's train/validation/test splits: rows of the run's pooled embeddings (federate/rows.py)."""
    name: str
    train: Rows
    val: Rows
    test: Rows
    domain: str = ""

    def sizes(self) -> dict[str, int]:
        return {p: len(getattr(self, p)) for p in ("train", "val", "test")}


_POOLS: dict = {}  # federate.cache.derived: the pooled tensors of a cache, per device


def pooled_embeddings(cache: EmbeddingCache, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache's embeddings and labels (every loaded domain, federate/cache.py) on the device, once per
    process and device; on a CPU they are the loaded arrays themselves, not a copy."""
    device = torch.device(device)
    return derived(_POOLS, cache, str(device), lambda: (torch.from_numpy(cache.features).to(device),
                                                         torch.from_numpy(cache.labels).to(device)))


def make_client(cache: EmbeddingCache, split, pool: tuple[torch.Tensor, torch.Tensor]) -> Client:
    """One client's splits (a federate.partition.ClientSplit) as rows of `pool` (`pooled_embeddings`)."""
    x, y = pool
    start = cache.domains[split.domain].start
    parts = [Rows(x, y, torch.from_numpy(split.rows[p] + start).to(x.device)) for p in ("train", "val", "test")]
    client = Client(split.name, *parts, domain=split.domain)
    check_split_sizes(split.name, client.sizes())  # an empty split would read as 0.00% accuracy
    return client


def describe_clients(clients: list[Client]) -> str:
    """The clients and their training rows, for the log (a count and a range when there are many)."""
    rows = [len(c.train) for c in clients]
    if len(clients) <= 12:
        return f"clients {', '.join(c.name for c in clients)} (train rows {rows})"
    return f"{len(clients)} clients of {min(rows)}-{max(rows)} training rows ({sum(rows)} in all)"


def domain_rows(cache: EmbeddingCache, domain: str, pool: tuple[torch.Tensor, torch.Tensor]) -> Rows:
    """Every row of a domain (the target), as rows of `pool`; an empty one is refused (it would read as 0%)."""
    x, y = pool
    d = cache.domains[domain]
    if not len(d.labels):
        which = f" of the classes dataset.classes keeps ({', '.join(cache.class_names)})" if cache.left_out else ""
        raise ConfigError(f"the target domain {domain} has no rows{which}, so its accuracy cannot be measured; pick "
                          "another target_domain (or target_domain=none), or other classes")
    return Rows(x, y, torch.arange(d.start, d.start + len(d.labels), device=x.device))


def class_text(cache: EmbeddingCache, device) -> torch.Tensor:
    """Raw class prompt embeddings [C, D], averaged over templates."""
    return torch.from_numpy(cache.text.mean(0)).to(device)


def capped_batch(settings: TrainSettings, rows: int) -> TrainSettings:
    """A batch no larger than the largest training set: a client with fewer rows than batch_size trains on
    one batch of all its rows per epoch, as a data loader would give it (the engines pad every batch to
    batch_size, which a huge batch_size would turn into gigabytes of padding)."""
    if settings.batch_size <= rows:
        return settings
    log.info("batch_size=%d is more than the largest training set (%d rows): each client trains on one batch "
             "of all its rows per epoch", settings.batch_size, rows)
    return replace(settings, batch_size=rows)


def cost_figures(method: Method, federation, clip_params: int, rounds: int) -> dict:
    """What crosses the wire (the method's `bytes_per_client` for each client that trains in a round,
    `Federation.trained_per_round`, and for every client in the exchange after the rounds, if the method
    has one), against FedAvg fine-tuning the whole CLIP; the trainable parameters of a client's model, its
    shared and its personal part."""
    clients = federation.trained_per_round
    sent = method.bytes_per_client(federation.global_state)
    per_round = {"up": clients * sent["up"], "down": clients * sent["down"]}
    total = {k: v * rounds for k, v in per_round.items()}
    after = method.after_rounds() if rounds else None
    if after:  # one more exchange with every client, once (CCVR's calibration)
        once = method.bytes_per_client(federation.global_state, after)
        after = {k: len(federation.units) * v for k, v in once.items()}
        total = {k: v + after[k] for k, v in total.items()}
    full = {"up": clients * 4 * clip_params, "down": clients * 4 * clip_params}
    shared = sum(v.numel() for v in federation.global_state.values())
    personal = federation.personal_params
    adapter_params = shared + personal
    return {
        "trainable_params": adapter_params, "shared_params": shared, "personal_params": personal,
        "bytes_per_round": per_round,
        "bytes_total": total,
        **({"bytes_after_rounds": after} if after else {}),
        "fedavg_full_clip": {
            "trainable_params": clip_params, "bytes_per_round": full,
            "param_ratio": clip_params / adapter_params if adapter_params else None,
        },
    }


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


COUNTS = ".count"  # a state's key for rows per class (statistics of features: FedProto, CCVR, FedPFT), not weights
EXPLODED_RMS = 100.0  # root mean square of a weight tensor: trained weights stay near 1 or below; lr=1e3 gives ~500


def weight_rms(key: str, norm: float, numel: int) -> float:
    """The root mean square of a state's tensor from its norm, what EXPLODED_RMS bounds; 0 for a tensor of
    counts (a key ending in `.count`: a client's rows per class), which are not weights."""
    return 0.0 if key.endswith(COUNTS) else norm / max(1, numel) ** 0.5


def check_finite(round_: int, losses: dict[str, float], state: dict[str, torch.Tensor], lr: float) -> None:
    """A run whose losses or weights are no longer finite, or whose weights exploded, has diverged: stop,
    never report its numbers (exploded weights saturate the adapter: accuracy falls to chance). Tensors of
    counts (keys ending in `.count`) are checked for finite values only."""
    exploded = EXPLODED_RMS
    bad = [n for n, v in losses.items() if not math.isfinite(v)]
    # one pass per tensor, nothing allocated (300 personal adapters weigh 630 MB): a NaN or inf makes the norm one
    norms = [(k, float(torch.linalg.vector_norm(v.float())), v.numel()) for k, v in state.items()
             if v.is_floating_point() and v.numel()]
    if not bad and all(math.isfinite(n) for _, n, _ in norms):
        rms = max((weight_rms(*kn) for kn in norms), default=0.0)
        if rms <= exploded:
            return
        bad_weights = f"exploding weights: root mean square {rms:.3g} > {exploded:g}"
    elif all(bool(torch.isfinite(v).all()) for v in state.values()):  # a norm beyond float32's range
        bad_weights = "exploding weights"
    else:
        bad_weights = "non-finite adapter weights"
    what = f"non-finite training loss for {', '.join(bad)}" if bad else bad_weights
    raise ConfigError(f"round {round_}: training diverged ({what}); no summary was written. Lower lr (now {lr})")


class RunLog:
    """history.jsonl written as the run goes (a run stopped early keeps every finished round), and the
    progress bar. A run directory holds one run: another run's outputs there are never overwritten; a run
    resumed from its checkpoint (`resume_round`) keeps the rows of the rounds it completed."""

    def __init__(self, output_dir: Path, rounds: int, progress: bool = True, resume_round: int | None = None):
        for name in ("summary.json", "history.jsonl"):
            if (output_dir / name).exists() and (name == "summary.json" or resume_round is None):
                raise ConfigError(f"{output_dir} already holds a run ({name}); give this run its own folder "
                                  "(hydra.run.dir=...) or move the old one away")
        path = output_dir / "history.jsonl"
        if resume_round is not None:  # rows after the checkpoint's round (or a half-written one) go
            kept, rounds_kept = [], []
            for line in (no_link(path).read_text().splitlines() if path.exists() else []):
                try:
                    row = json.loads(line)
                    if row["round"] <= resume_round:
                        kept.append(line + "\n")
                        rounds_kept.append(row["round"])
                except (ValueError, KeyError, TypeError, RecursionError):
                    pass
            if rounds_kept != list(range(1, resume_round + 1)):  # the records of a completed round are gone
                raise ConfigError(f"{path} does not hold rounds 1 to {resume_round}, which the checkpoint says were "
                                  f"completed; remove {output_dir}/checkpoint* and history.jsonl to start the run over")
            write_text(path, "".join(kept))
        self.file = open(no_link(path), "a" if resume_round is not None else "x", opener=no_follow)
        self.bar = progress_bar(rounds, resume_round or 0) if progress else None

    def end_round(self, row: dict, rounds: int, best: dict | None) -> None:
        """Append the round to history.jsonl, log it and move the progress bar (`best`: the selected
        round's row so far)."""
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        target = best.get("target_acc") if best else None
        best_target = "none" if target is None else f"{target:.4f}"
        val = row["val_acc"]  # every client's, or the worst of many
        clients = " ".join(f"{n} {a:.4f}" for n, a in val.items()) if len(val) <= 8 else \
            f"worst of {len(val)} clients {min(val.values()):.4f}"
        round_log.info("round %d/%d  val %s  mean %.4f%s", row["round"], rounds, clients, row["val_mean"],
                       f"  * best: target {best_target}" if row.get("improved") else "")
        if self.bar is not None:
            self.bar.set_postfix_str(f"val {row['val_mean']:.4f}  best target {best_target} "
                                     f"(round {best['round'] if best else 0})", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.file.close()
        if self.bar is not None:
            self.bar.close()


def progress_bar(rounds: int, initial: int = 0, desc: str = "rounds"):
    """A bar over the rounds on an interactive terminal (the per-round lines then go to the log file only)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=rounds, initial=initial, unit="round", desc=desc, dynamic_ncols=True, leave=True)


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False


class HideRoundsOnTerminal:
    """Logging filter for the console handler (conf/federate.yaml); the log file keeps every line. On an
    interactive terminal the progress bar replaces the per-round lines. Without one, a sweep's job shows
    every tenth round (and the last), and the rounds of grouped points (federate/sweep.py, replayed after
    the group trained, which logged its own progress) not at all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != round_log.name:
            return True
        if sys.stderr.isatty() or getattr(record, "grouped", False):
            return False
        if not in_multirun() or len(record.args or ()) < 2:
            return True
        r, rounds = record.args[:2]
        return r == rounds or r % max(1, rounds // 10) == 0


def summarize(cfg, method: Method, dataset: str, model: str, federation, cost: dict, target_size: int | None,
              adapter: Adapter | None, strategy, identity: dict | None = None) -> dict:
    """summary.json's fields: the settings, the selected round's accuracies (federation.summary_fields),
    the cost, and what the run computed on (`identity`: the cache's and the splits' sha256)."""
    clients = federation.clients
    return {
        "method": method.name, "dataset": dataset, "model": model, "target_domain": federation.target,
        "participants": list(dict.fromkeys(c.domain for c in clients)),
        "seed": int(cfg.seed), "lr": float(cfg.lr), "rounds": int(federation.rounds),  # (the method's: fedpft 1)
        "local_epochs": int(cfg.local_epochs), "batch_size": int(cfg.batch_size),
        "aggregation": cfg.aggregation, "loss": cfg.loss, "text_adapter": bool(cfg.text_adapter),
        "mu": float(cfg.method.get("mu", 0.0)), "engine": cfg.engine,
        "precision": cfg.get("precision", "fp32"), "method_settings": method.describe(),
        "adapter": adapter.describe() if adapter is not None and federation.rounds else None,
        "strategy": strategy.describe() if strategy is not None and method.communicates else None,
        **federation.summary_fields(),
        **cost, "split_sizes": {c.name: c.sizes for c in clients}, "target_size": target_size,
        "partition": OmegaConf.to_container(cfg.partition, resolve=True) if OmegaConf.is_config(cfg.partition)
        else dict(cfg.partition),
        **(identity or {}),
    }


def identity_of(cache, splits_text: str) -> dict:
    """What a cached run computed on: the cache's identity and checksums, the splits (splits.json's text),
    and for cache_file=hf://... the repo and the commit the cache came from."""
    out = {"cache_identity_sha256": cache.identity_sha256, "cache_checksums": dict(cache.checksums),
           "splits_sha256": hashlib.sha256(splits_text.encode()).hexdigest(),
           # the images and the model it was built from: the report puts runs that trained on the same images
           # (the backbone baselines) beside the ones on this cache
           "cache_inputs_fingerprint": cache.inputs_fingerprint or None,
           "cache_model_fingerprint": cache.model_fingerprint or None}
    hub = HUB_CACHES.get(str(Path(cache.path).resolve()))
    if hub:
        out["cache_hub"] = hub
    return out


def percent(value: float | None) -> str:
    return "none" if value is None else f"{100 * value:.2f}%"


def finish(output_dir: Path, summary: dict, cfg, start: float) -> dict:
    """Write summary.json and log the result and the cost."""
    summary["wall_seconds"] = time.time() - start
    summary["config"] = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    write_text(output_dir / "summary.json", json.dumps(summary, indent=2))
    per = summary["personalization"]  # every client's, or per domain when there are many
    if len(per) > 8 and summary.get("personalization_domains"):
        per = {f"{d} ({sum(c['domain'] == d for c in summary['clients'].values())} clients)": v
               for d, v in summary["personalization_domains"].items()}
    log.info("best round %d (%s): generalization (%s) %s, personalization %s (mean %.2f%%), overall %.2f%%",
             summary["best_round"], summary["selection"], summary["target_domain"], percent(summary["generalization"]),
             ", ".join(f"{k} {100 * v:.2f}%" for k, v in per.items()), 100 * summary["personalization_mean"],
             100 * summary["overall"])
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
    """The selected round's states: the shared state under its plain keys (`image.0.weight`, ... for AttAI)
    and each client's personal state under `<client>/<key>`."""
    tensors = {k: v.contiguous().cpu() for k, v in best["shared"].items()}
    tensors.update({f"{n}/{k}": v[i].contiguous().cpu() for k, v in best["personal"].items() for i, n in enumerate(names)})
    config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    metadata = {"method": method.name, "model": model, "dataset": dataset, "target_domain": target or NO_TARGET,
                "round": str(best["row"]["round"]), "embed_dim": str(embed_dim), "config": json.dumps(config),
                "shared": json.dumps(sorted(best["shared"])), "personal": json.dumps(sorted(best["personal"]))}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
