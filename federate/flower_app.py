"""FedCLIP as Flower apps (Message API): the in-process runner's local update, aggregation and outputs,
with clients that are separate processes or machines.

- ClientApp: one SuperNode is one participating domain: node config `partition` (a domain name) or
  `partition-id` (an index into the participants, as Flower's simulation sets it), and optionally
  `cache-file` (where this machine keeps the cache; by default the server's path). It reads only its own
  domain's embeddings, trains the adapter it is sent with the batched engine, and replies with the adapter
  weights and metrics. It evaluates its validation and test splits when asked.
- ServerApp: sends the global adapter, rejects malformed updates (wrong keys or shapes, non-finite values),
  aggregates the rest (federate.strategy), runs model selection on the clients' validation accuracy,
  evaluates the held-out target domain itself, and writes the same summary.json, history.jsonl and
  adapter.safetensors as the in-process runner. A client that fails or times out is dropped for the rest
  of the run; the run goes on while at least `min_clients` remain, and otherwise stops, keeping what it
  recorded.

Run it with `python -m federate backend=flower` (Flower's simulation engine, one machine) or deployed with
`flwr run . <superlink connection>` (see the README); the run config is [tool.flwr.app.config] in
pyproject.toml.
"""
from __future__ import annotations

import json
import logging
import time
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from . import strategy
from .adapter import init_adapters, num_parameters
from .cache import load_cache
from .engine import BatchedTrainer, ClientSets, client_generator
from .errors import ConfigError
from .evaluate import accuracies
from .run import (FEDERATED, RunLog, check_settings, class_text, client_splits, cost_figures, domain_tensors,
                  finish, make_client, resolve_device, save_adapters, summarize, target_and_participants,
                  train_settings)

log = logging.getLogger(__name__)

# Settings that travel with every message, so a client needs no configuration of its own but its data.
SHIPPED = ("cache_file", "model_name", "method", "mu", "lr", "local_epochs", "batch_size", "seed", "loss",
           "split_file")


def config_from_flat(flat: dict) -> DictConfig:
    """The federate config (conf/federate.yaml's shape) from Flower's flat run config."""
    return OmegaConf.create({
        "cache_file": flat["cache_file"], "model": {"name": flat["model_name"]},
        "method": {"name": flat.get("method", "fedclip"), "mu": float(flat.get("mu", 0.0))},
        "target_domain": flat.get("target_domain") or None, "lr": float(flat.get("lr", 5e-5)),
        "rounds": int(flat.get("rounds", 200)), "local_epochs": int(flat.get("local_epochs", 1)),
        "batch_size": int(flat.get("batch_size", 32)), "seed": int(flat.get("seed", 0)),
        "aggregation": flat.get("aggregation", "uniform"), "loss": flat.get("loss", "contrastive"),
        "text_adapter": bool(flat.get("text_adapter", False)), "finetune_epochs": 0,
        "split_file": flat.get("split_file") or None, "engine": "batched", "device": flat.get("device", "auto"),
        "output_dir": flat.get("output_dir", "outputs/flower"), "backend": "flower",
        "flower": {"min_clients": int(flat.get("min_clients", 2)), "round_timeout": float(flat.get("round_timeout", 600)),
                   "startup_timeout": float(flat.get("startup_timeout", 120))},
    })


def flat_from_config(cfg) -> dict:
    return {"cache_file": str(cfg.cache_file), "model_name": cfg.model.name, "method": cfg.method.name,
            "mu": float(cfg.method.get("mu", 0.0)), "target_domain": cfg.target_domain or "", "lr": float(cfg.lr),
            "rounds": int(cfg.rounds), "local_epochs": int(cfg.local_epochs), "batch_size": int(cfg.batch_size),
            "seed": int(cfg.seed), "aggregation": cfg.aggregation, "loss": cfg.loss,
            "text_adapter": bool(cfg.text_adapter), "split_file": cfg.split_file or "", "device": cfg.device,
            "min_clients": int(cfg.flower.min_clients), "round_timeout": float(cfg.flower.round_timeout),
            "startup_timeout": float(cfg.flower.startup_timeout)}


# ---------------------------------------------------------------- client
def device_of(name: str) -> torch.device:
    """A client's device: the server's choice when this machine has it, else the CPU (sites differ)."""
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=2)
def client_data(cache_file: str, model_name: str, domain: str, seed: int, split_file: str, device: str):
    """This client's splits (only its domain is read), class prompts and logit scale; kept across rounds."""
    cache = load_cache(cache_file, model_name, domains=(domain,))
    split = client_splits(cache, [domain], seed, split_file or None)[domain]
    dev = device_of(device)
    return make_client(cache, domain, split, dev), class_text(cache, dev), cache.logit_scale


def client_of(msg: Message, context: Context):
    settings = json.loads(msg.content["config"]["settings"])
    participants = json.loads(msg.content["config"]["participants"])
    node = context.node_config
    if node.get("partition"):
        domain = str(node["partition"])
    elif "partition-id" in node and 0 <= int(node["partition-id"]) < len(participants):
        domain = participants[int(node["partition-id"])]
    else:
        raise ConfigError(f"this SuperNode has no domain: start it with --node-config \"partition='<domain>'\" "
                          f"(one of {', '.join(participants)})")
    cache_file = node.get("cache-file") or settings["cache_file"]
    client, text, scale = client_data(cache_file, settings["model_name"], domain, settings["seed"],
                                      settings["split_file"], settings.get("device", "auto"))
    return settings, client, text, scale


def received_state(msg: Message, device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in msg.content["arrays"].to_torch_state_dict().items()}


client_app = ClientApp()


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    settings, client, text, scale = client_of(msg, context)
    cfg = config_from_flat(settings)
    glob = received_state(msg, client.train[0].device)
    state = strategy.stack(glob, 1)
    round_ = int(msg.content["config"]["round"])
    trainer = BatchedTrainer(ClientSets([client.train[0]], [client.train[1]]), text, scale, train_settings(cfg))
    loss = trainer.train(state, cfg.local_epochs, [client_generator(cfg.seed, client.name, round_)],
                         anchor=glob if cfg.method.name == "fedprox" and cfg.method.mu else None)
    reply = RecordDict({
        "arrays": ArrayRecord.from_torch_state_dict({k: v[0] for k, v in state.items()}),
        "metrics": MetricRecord({"num-examples": len(client.train[1]), "train_loss": float(loss[0])}),
        "config": ConfigRecord({"domain": client.name}),
    })
    return Message(reply, reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    _, client, text, _ = client_of(msg, context)
    state = {k: v[None] for k, v in received_state(msg, client.train[0].device).items()}
    val, test = accuracies([state, state], [client.val, client.test], text)
    sizes = client.sizes()
    reply = RecordDict({
        "metrics": MetricRecord({"val_acc": val, "test_acc": test, "num-examples": sizes["val"]}),
        "config": ConfigRecord({"domain": client.name, "sizes": json.dumps(sizes)}),
    })
    return Message(reply, reply_to=msg)


# ---------------------------------------------------------------- server
def check_update(arrays: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> str | None:
    """Why a client's update cannot be aggregated, or None when it can."""
    if set(arrays) != set(reference):
        return f"keys {sorted(arrays)} instead of {sorted(reference)}"
    for k, v in arrays.items():
        if v.shape != reference[k].shape:
            return f"{k} has shape {tuple(v.shape)} instead of {tuple(reference[k].shape)}"
        if not torch.isfinite(v).all():
            return f"{k} has non-finite values"
    return None


class Federation:
    """The server side of one run: which nodes are still in, and one exchange of messages with them."""

    def __init__(self, grid: Grid, cfg, participants: list[str]):
        self.grid, self.cfg = grid, cfg
        settings = {k: v for k, v in flat_from_config(cfg).items() if k in SHIPPED}
        self.shipped = {"settings": json.dumps(settings), "participants": json.dumps(participants)}
        self.nodes = self._wait_for_nodes(len(participants))
        self.domain_of: dict[int, str] = {}

    def _wait_for_nodes(self, expected: int) -> list[int]:
        deadline = time.time() + self.cfg.flower.startup_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= expected or time.time() > deadline:
                break
            time.sleep(0.5)
        if len(nodes) < self.cfg.flower.min_clients:
            raise ConfigError(f"only {len(nodes)} Flower client(s) connected within "
                              f"{self.cfg.flower.startup_timeout:.0f} s; need flower.min_clients="
                              f"{self.cfg.flower.min_clients}")
        log.info("%d Flower clients connected", len(nodes))
        return nodes

    def exchange(self, kind: str, state: dict[str, torch.Tensor], round_: int) -> list[Message]:
        """Send the global adapter to every remaining node; return the good replies, dropping failed nodes."""
        # each Message owns its content, so every node gets its own RecordDict
        content = lambda: RecordDict({"arrays": ArrayRecord.from_torch_state_dict(state),  # noqa: E731
                                      "config": ConfigRecord({"round": round_, **self.shipped})})
        messages = [Message(content(), dst_node_id=n, message_type=kind, group_id=str(round_)) for n in self.nodes]
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.flower.round_timeout))
        answered = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("round %d: client %s failed (%s); dropping it", round_, self._name(node), reply.error.reason)
                continue
            answered[node] = reply
            self.domain_of[node] = str(reply.content["config"]["domain"])
        for node in set(self.nodes) - set(answered):
            log.warning("round %d: client %s did not answer within %.0f s; dropping it", round_, self._name(node),
                        self.cfg.flower.round_timeout)
        self.nodes = sorted(answered)
        if len(self.nodes) < self.cfg.flower.min_clients:
            raise ConfigError(f"round {round_}: only {len(self.nodes)} client(s) left, fewer than "
                              f"flower.min_clients={self.cfg.flower.min_clients}; stopping (the rounds so far are kept)")
        return [answered[n] for n in self.nodes]

    def _name(self, node: int) -> str:
        return f"{self.domain_of.get(node, '?')} (node {node})"


def serve(grid: Grid, cfg, output_dir: Path) -> dict:
    """The federated rounds on the server (what federate.run does in-process)."""
    start = time.time()
    output_dir.mkdir(parents=True, exist_ok=True)
    check_settings(cfg)
    if cfg.method.name not in FEDERATED:
        raise ConfigError(f"backend=flower runs the federated methods ({', '.join(FEDERATED)}), not {cfg.method.name}")
    device = resolve_device(cfg.device)
    torch.set_flush_denormal(True)
    header = load_cache(cfg.cache_file, cfg.model.name, domains=())
    target, participants = target_and_participants(list(header.all_domains), cfg.target_domain, header.path)
    cache = load_cache(cfg.cache_file, cfg.model.name, domains=(target,))  # the server holds the held-out domain
    target_set, text = domain_tensors(cache, target, device), class_text(cache, device)
    towers = ("image", "text") if cfg.text_adapter else ("image",)
    global_state = {k: v.to(device) for k, v in init_adapters(cache.embed_dim, cfg.seed, towers).items()}
    cost = cost_figures(cfg.method.name, num_parameters(global_state), len(participants),
                        cache.model_num_parameters, cfg.rounds)
    log.info("%s over Flower: target %s, participants %s", cfg.method.name, target, ", ".join(participants))
    federation = Federation(grid, cfg, participants)
    runlog, sizes = RunLog(output_dir), {}
    stopped = None
    try:
        for r in range(1, cfg.rounds + 1):
            replies = federation.exchange(MessageType.TRAIN, global_state, r)
            updates, counts, losses = [], [], {}
            for reply in replies:
                domain = str(reply.content["config"]["domain"])
                arrays = {k: v.to(device) for k, v in reply.content["arrays"].to_torch_state_dict().items()}
                problem = check_update(arrays, global_state)
                if problem:
                    log.warning("round %d: rejected the update of %s: %s", r, domain, problem)
                    continue
                updates.append(arrays)
                counts.append(int(reply.content["metrics"]["num-examples"]))
                losses[domain] = float(reply.content["metrics"]["train_loss"])
            if len(updates) < cfg.flower.min_clients:
                raise ConfigError(f"round {r}: only {len(updates)} acceptable update(s), fewer than "
                                  f"flower.min_clients={cfg.flower.min_clients}; stopping (the rounds so far are kept)")
            stacked = {k: torch.stack([u[k] for u in updates]) for k in global_state}
            global_state = strategy.aggregate_train(stacked, strategy.client_weights(counts, cfg.aggregation))

            val_acc, test_acc = {}, {}
            for reply in federation.exchange(MessageType.EVALUATE, global_state, r):
                domain = str(reply.content["config"]["domain"])
                val_acc[domain] = float(reply.content["metrics"]["val_acc"])
                test_acc[domain] = float(reply.content["metrics"]["test_acc"])
                sizes[domain] = json.loads(reply.content["config"]["sizes"])
            val_acc, test_acc = dict(sorted(val_acc.items())), dict(sorted(test_acc.items()))
            row = {"round": r, "train_loss": dict(sorted(losses.items())), "val_acc": val_acc,
                   "val_mean": sum(val_acc.values()) / len(val_acc)}
            if runlog.improves(val_acc):
                shared = {k: v[None] for k, v in global_state.items()}
                target_acc = accuracies([shared], [target_set], text)[0]
                runlog.record_best(r, val_acc, test_acc, target_acc, [shared])
                row.update(test_acc=test_acc, target_acc=target_acc, improved=True)
            runlog.end_round(row, cfg.rounds)
    except ConfigError as e:
        if not runlog.best["states"]:
            raise
        stopped = str(e)
        log.error("%s", e)
    finally:
        runlog.close()
    summary = summarize(cfg, cfg.method.name, cache.dataset_name, cache.model_name, target, runlog.best, cost,
                        {d: sizes[d] for d in sorted(sizes)}, len(target_set[1]))
    summary["backend"] = "flower"
    if stopped:
        summary["stopped"] = stopped
    save_adapters(output_dir / "adapter.safetensors", cfg.method.name, list(sizes), runlog.best, cache.dataset_name,
                  cache.model_name, cache.embed_dim, target, cfg)
    return finish(output_dir, summary, cfg, start)


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Deployed with `flwr run`: settings from the run config ([tool.flwr.app.config] and --run-config)."""
    cfg = config_from_flat(dict(context.run_config))
    try:
        serve(grid, cfg, Path(cfg.output_dir))
    except ConfigError as e:
        log.error("%s", e)
        raise SystemExit(2) from None


def run_simulation(cfg, output_dir: Path) -> dict:
    """`python -m federate backend=flower`: the same apps in Flower's simulation engine, one SuperNode
    per participating domain, on this machine."""
    try:
        from flwr.simulation import run_simulation as flower_simulation
    except ImportError:
        raise ConfigError("backend=flower needs Flower's simulation engine: pip install -e '.[flower]'") from None
    header = load_cache(cfg.cache_file, cfg.model.name, domains=())
    _, participants = target_and_participants(list(header.all_domains), cfg.target_domain, header.path)
    result, app = {}, ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result.update(serve(grid, cfg, output_dir))

    flower_simulation(server_app=app, client_app=client_app, num_supernodes=len(participants),
                      backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                      "init_args": {"num_cpus": 2, "include_dashboard": False}})
    if not result:
        raise ConfigError("the Flower simulation ended without a result; see the log above")
    return result
