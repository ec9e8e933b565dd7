"""The Flower ServerApp: sends the global adapter, rejects malformed updates (wrong keys or shapes,
non-finite values), combines the rest with the run's server strategy (federate/strategy.py), runs model
selection on the clients' validation accuracy, evaluates the held-out target domain itself, and writes the
same summary.json, history.jsonl and adapter.safetensors as the in-process runner. A client that fails or
times out is dropped for the rest of the run; the run goes on while at least `flower.min_clients` remain,
and otherwise stops, keeping what it recorded.

Deployed with `flwr run . <superlink connection>` (see the README); the run config ([tool.flwr.app.config]
in pyproject.toml, and --run-config) holds Hydra overrides of conf/federate.yaml plus `output_dir`.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from omegaconf import open_dict

from .. import adapters, strategy
from ..cache import load_cache
from ..errors import ConfigError
from ..evaluate import accuracies
from ..engine import autocast
from ..experiment import (RunLog, cache_path, check_finite, check_settings, class_text, cost_figures, domain_tensors, finish,
                          resolve_device, save_adapters, summarize, target_and_participants)
from .task import check_update, settings_from_run_config, ship

log = logging.getLogger("federate")


class Federation:
    """The server side of one run: which nodes are still in, and one exchange of messages with them."""

    def __init__(self, grid: Grid, cfg, participants: list[str]):
        self.grid, self.cfg = grid, cfg
        self.shipped = {"settings": ship(cfg), "participants": json.dumps(participants)}
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
    method = check_settings(cfg)
    if not cfg.cache_file:  # deployed with `flwr run`: the default path, as the in-process runner finds it
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.cache_file = str(cache_path(cfg))
    if not method.flower:
        raise ConfigError(f"Flower runs the federated methods (fedclip, fedprox), not {method.name}")
    device = resolve_device(cfg.device)
    torch.set_flush_denormal(True)
    adapter, server = adapters.build(cfg.adapter, text_tower=cfg.text_adapter), strategy.build(cfg.strategy, cfg.aggregation)
    header = load_cache(cfg.cache_file, cfg.model.name, domains=())
    target, participants = target_and_participants(list(header.all_domains), cfg.target_domain, header.path)
    cache = load_cache(cfg.cache_file, cfg.model.name, domains=(target,))  # the server holds the held-out domain
    adapter.prepare(cache, cfg.model)
    target_set, text = domain_tensors(cache, target, device), class_text(cache, device)
    global_state = {k: v.to(device) for k, v in adapters.init_params(adapter, cache.embed_dim, cfg.seed, text).items()}
    cost = cost_figures(method, adapters.num_parameters(global_state), len(participants),
                        cache.model_num_parameters, cfg.rounds)
    log.info("%s over Flower: target %s, participants %s", method.name, target, ", ".join(participants))
    federation = Federation(grid, cfg, participants)
    runlog, sizes = RunLog(output_dir, cfg.rounds), {}
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
            global_state = server.aggregate_train(global_state, stacked, counts)
            check_finite(r, losses, global_state, cfg.lr)

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
                with autocast(cfg.precision, device):  # as the in-process runner evaluates
                    target_acc = accuracies(adapter, [global_state], [target_set], text, cache.logit_scale)[0]
                runlog.record_best(r, val_acc, test_acc, target_acc, [global_state])
                row.update(test_acc=test_acc, target_acc=target_acc, improved=True)
            runlog.end_round(row, cfg.rounds)
    except ConfigError as e:
        if not runlog.best["states"] or "diverged" in str(e):
            raise
        stopped = str(e)
        log.error("%s", e)
    finally:
        runlog.close()
    summary = summarize(cfg, method, cache.dataset_name, cache.model_name, target, runlog.best, cost,
                        {d: sizes[d] for d in sorted(sizes)}, len(target_set[1]), adapter, server)
    summary["backend"] = "flower"
    if stopped:
        summary["stopped"] = stopped
    save_adapters(output_dir / "adapter.safetensors", method, list(sizes), runlog.best, cache.dataset_name,
                  cache.model_name, cache.embed_dim, target, cfg)
    return finish(output_dir, summary, cfg, start)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployed with `flwr run`: settings from the run config ([tool.flwr.app.config] and --run-config)."""
    try:
        cfg, output_dir = settings_from_run_config(dict(context.run_config))
        serve(grid, cfg, output_dir)
    except ConfigError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
