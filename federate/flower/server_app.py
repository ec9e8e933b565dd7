"""The Flower ServerApp: the run's rounds (federate/federation.py) with Flower as the backend.

At the start every SuperNode says which client it is and its split sizes (a query message). Each round
the server sends the global adapter to the sampled clients and combines their updates with the run's
strategy (federate/strategy.py), or as the method says (federate/methods/: clients that send statistics of
their features, an exchange after the rounds such as CCVR's calibration); every client evaluates the new
adapter on its validation and test splits; the server evaluates the held-out target domain itself, in
fp32. The server makes the clients' splits as the in-process runner does and writes them to splits.json;
a node whose client or split sizes are not in them takes no part. The server checks everything a client
sends: arrays of the expected keys, dtypes (float32 for weights) and shapes, as the method's `update_like`
gives them (read from the headers before the data is deserialised), and finite; example counts positive
integers no larger than the split the client reported, and so are rows per class together (what weighs a
client's feature statistics); losses finite; accuracies finite and in [0, 1]. A
client that breaks a rule, fails or times out is dropped for the rest of the run (logged, and listed in
summary.json's `dropped_clients`); the run goes on while at least `flower.min_clients` remain, and
otherwise stops, keeping what it recorded.

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

from extract.files import own_folder, write_text

from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from .. import adapters, privacy, strategy
from ..cache import load_cache
from ..errors import ConfigError
from ..evaluate import accuracies
from ..experiment import (cache_path, check_settings, class_text, cost_figures, domain_rows, identity_of,
                          pooled_embeddings, resolve_device, save_adapters, target_and_participants)
from ..federation import ClientInfo, Federation
from ..lifecycle import Experiment, RoundsStopped, execute
from ..training import Update
from ..partition import make_clients, splits_json
from .grid import PullingGrid
from .task import (check_arrays, check_counts, check_eval_metrics, check_registration, check_train_metrics,
                   check_update, settings_from_run_config, ship)

log = logging.getLogger("federate")


class Nodes:
    """The SuperNodes of one run: which client each is, which are still in, one exchange of messages."""

    def __init__(self, grid: Grid, cfg, participants: list[str], sizes: dict[str, dict[str, int]],
                 domains: dict[str, str], client_states: Path | None = None):
        # each client's split sizes and domain, from the server's own splits (splits.json): what a node says
        # of itself is checked against them, never believed
        self.grid, self.cfg, self.sizes, self.domains = grid, cfg, sizes, domains
        self.shipped = {"settings": ship(cfg), "participants": json.dumps(participants)}
        if client_states is not None:  # (the simulation: the clients share this machine's disk)
            self.shipped["state-dir"] = str(client_states)
        self.clip_norm: float | None = None  # privacy=dp_client side=client: sent with training messages
        self.client_of: dict[int, str] = {}
        self.dropped: dict[str, str] = {}  # the Federation's record of dropped clients, once it exists
        self.absent: dict[str, str] = {}  # clients of the splits that no usable node registered as
        self.nodes = self._wait_for_nodes(len(sizes))
        self.clients = self._register()

    def _wait_for_nodes(self, expected: int) -> list[int]:
        deadline = time.time() + self.cfg.flower.startup_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= expected or time.time() > deadline:
                break
            time.sleep(0.5)
        self._check_enough(len(nodes), f"only {len(nodes)} Flower client(s) connected within "
                                        f"{self.cfg.flower.startup_timeout:.0f} s")
        log.info("%d Flower clients connected", len(nodes))
        return nodes

    def _check_enough(self, count: int, what: str) -> None:
        if count < self.cfg.flower.min_clients:
            raise ConfigError(f"{what}; need flower.min_clients={self.cfg.flower.min_clients}")

    def _register(self) -> list[ClientInfo]:
        """Each node's client and split sizes; a node that says nothing usable, or names a client another
        node already is, takes no part."""
        infos, unusable = {}, {}
        for node, reply in self.exchange(MessageType.QUERY, None, 0).items():
            got = check_registration(reply.content["config"]) if "config" in reply.content else "no config"
            why = got if isinstance(got, str) else self._not_usable(*got, infos)
            if why:
                log.warning("node %s is not a client of this run: %s", node, why)
                self.nodes.remove(node)
                if not isinstance(got, str) and got[0] in self.sizes:
                    unusable[got[0]] = why
                continue
            name, _, sizes = got
            infos[name] = ClientInfo(name, self.domains[name], sizes)  # the domain of the server's splits
            self.client_of[node] = name
        # every client of the splits takes part, or is listed as dropped with the reason (summary.json)
        self.absent = {c: f"at the start: {unusable.get(c, 'no Flower node registered as this client')}"
                       for c in self.sizes if c not in infos}
        if self.absent:
            log.warning("%d of the run's %d clients take no part: %s", len(self.absent), len(self.sizes),
                        "; ".join(f"{c} ({w})" for c, w in list(self.absent.items())[:5]))
        self._check_enough(len(infos), f"only {len(infos)} of the run's {len(self.sizes)} clients registered")
        return sorted(infos.values(), key=lambda c: (-c.sizes["train"], c.name))  # the in-process order

    def _not_usable(self, name: str, domain: str, sizes: dict[str, int], infos: dict) -> str | None:
        """Why a registered client cannot take part (another node is it, or the run's splits do not give it
        these sizes), or None."""
        if name in infos:
            return f"client {name} is already node {self._node_of(name)}"
        if name not in self.sizes:
            return f"client {name} is not one of this run's clients ({', '.join(self.sizes)})"
        if sizes != self.sizes[name]:
            return (f"client {name} has split sizes {sizes}, this run's splits give it {self.sizes[name]} (does "
                    "its cache-file hold the server's cache?)")
        if domain != self.domains[name]:
            return f"client {name} says its domain is {domain!r}, this run's splits put it in {self.domains[name]!r}"
        return None

    def _node_of(self, client: str) -> int | None:
        return next((n for n, c in self.client_of.items() if c == client), None)

    def exchange(self, kind: str, state: dict[str, torch.Tensor] | None, round_: int,
                 clients: list[str] | None = None) -> dict[int, Message]:
        """Send to the remaining nodes (of `clients`, if given); return their replies, dropping the nodes
        that fail or do not answer."""
        nodes = [n for n in self.nodes if clients is None or self.client_of.get(n) in clients]

        # DP-FedAvg with client-side clipping: Flower's fixedclipping_mod on the clients reads the norm here
        clip = {KEY_CLIPPING_NORM: self.clip_norm} if kind == MessageType.TRAIN and self.clip_norm is not None else {}

        def content():  # each Message owns its content, so every node gets its own RecordDict
            records = {"config": ConfigRecord({"round": round_, **self.shipped, **clip})}
            if state is not None:
                records["arrays"] = ArrayRecord.from_torch_state_dict(state)
            return RecordDict(records)

        messages = [Message(content(), dst_node_id=n, message_type=kind, group_id=str(round_)) for n in nodes]
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.flower.round_timeout))
        answered = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in nodes:
                continue
            if reply.has_error():
                self.drop(node, round_, f"failed ({reply.error.reason})")
            else:
                answered[node] = reply
        for node in set(nodes) - set(answered) - {n for n in nodes if n not in self.nodes}:
            self.drop(node, round_, f"did not answer within {self.cfg.flower.round_timeout:.0f} s")
        return {n: answered[n] for n in sorted(answered) if n in self.nodes}

    def drop(self, node: int, round_: int, why: str) -> None:
        """This node takes no further part in the run."""
        name = self.client_of.get(node)
        log.warning("%s: %s %s; dropping it", f"round {round_}" if round_ else "at the start",
                    f"client {name} (node {node})" if name else f"node {node}", why)
        if node in self.nodes:
            self.nodes.remove(node)
        if node in self.client_of:
            self.dropped[name] = f"round {round_}: {why}"
        remaining = len(self.nodes)
        if round_ and remaining < self.cfg.flower.min_clients:
            raise RoundsStopped(f"round {round_}: only {remaining} client(s) left, fewer than flower.min_clients="
                              f"{self.cfg.flower.min_clients}; stopping (the rounds so far are kept)")


class FlowerBackend:
    """Local training and evaluation by the clients' SuperNodes, the target domain on the server."""

    def __init__(self, nodes: Nodes, federation: Federation, adapter, target_set, text, scale: float):
        self.nodes, self.federation = nodes, federation
        self.adapter, self.target_set, self.text, self.scale = adapter, target_set, text, scale
        federation.dropped.update({c: why for c, why in nodes.absent.items() if c not in federation.dropped})
        nodes.dropped = federation.dropped
        # a resumed run: the clients dropped before its checkpoint stay out, as they would have
        nodes.nodes = [n for n in nodes.nodes if nodes.client_of.get(n) not in federation.dropped]
        self.sizes = {c.name: c.sizes for c in federation.clients}

    def _answer(self, node: int, reply: Message, check) -> str | None:
        """The reply's problem (it names another client, or breaks a rule), or None."""
        try:
            claimed = str(reply.content["config"]["client"])
            if claimed != self.nodes.client_of[node]:
                return f"replied as client {claimed}"
            return check(reply)
        except (KeyError, TypeError, ValueError) as e:
            return f"sent a malformed reply ({type(e).__name__}: {e})"

    def train(self, federation: Federation, round_, sampled: list[int]) -> Update:
        """The sampled clients' local update in a round (or in the method's exchange after the rounds, whose
        name `round_` is then): each reply checked against what the method says a client sends."""
        names = [federation.units[i] for i in sampled]
        glob = federation.global_state
        like = federation.method.update_like(glob, round_)
        replies = self.nodes.exchange(MessageType.TRAIN, glob, round_, names)
        updates, counts, losses = [], [], {}
        # in the order of the sampled clients, not of the nodes' random ids: the sums' float order is fixed
        for node, reply in sorted(replies.items(), key=lambda item: names.index(self.nodes.client_of[item[0]])):
            name = self.nodes.client_of[node]
            arrays = {}

            def check(r):
                problem = check_train_metrics(r.content["metrics"], self.sizes[name],
                                              loss=federation.private != "dpsgd") or \
                    check_arrays(r.content["arrays"], like)
                if problem:
                    return problem
                arrays.update({k: v.to(like[k].device) for k, v in r.content["arrays"].to_torch_state_dict().items()})
                return check_update(arrays, like) or check_counts(arrays, self.sizes[name]["train"])

            problem = self._answer(node, reply, check)
            if problem:
                self.nodes.drop(node, round_, f"sent an update the server rejects: {problem}")
                continue
            updates.append(arrays)
            counts.append(int(reply.content["metrics"]["num-examples"]))
            if "train_loss" in reply.content["metrics"]:  # (DP-SGD: a client keeps its training loss)
                losses[name] = float(reply.content["metrics"]["train_loss"])
        if not updates:  # every sampled client was dropped: the global adapter stays
            return Update({k: v.unsqueeze(0) for k, v in glob.items()}, [], {})
        return Update({k: torch.stack([u[k] for u in updates]) for k in like}, counts, dict(sorted(losses.items())))

    def evaluate(self, federation: Federation, parts: set) -> dict:
        """Each client evaluates the model it deploys (the shared state sent, with its personal one); the
        server evaluates the method's target models on the held-out domain."""
        out, state = {}, federation.global_state
        if parts & {"val", "test"}:
            val, test = {}, {}
            round_ = federation.current_round
            for node, reply in self.nodes.exchange(MessageType.EVALUATE, state, round_).items():
                sizes = self.sizes[self.nodes.client_of[node]]
                problem = self._answer(node, reply, lambda r: check_eval_metrics(r.content["metrics"], sizes))
                if problem:
                    self.nodes.drop(node, round_, f"sent metrics the server rejects: {problem}")
                    continue
                name = self.nodes.client_of[node]
                val[name] = float(reply.content["metrics"]["val_acc"])
                test[name] = float(reply.content["metrics"]["test_acc"])
            order = [c.name for c in self.federation.clients if c.name in val]
            out.update(val={n: val[n] for n in order}, test={n: test[n] for n in order})
        if "target" in parts:  # fp32, as the in-process runner evaluates
            models = federation.method.target_models(state, {})
            out["target"] = accuracies(self.adapter, models, [self.target_set] * len(models), self.text, self.scale)
        return out


def serve(grid: Grid, cfg, output_dir: Path, client_states: Path | None = None) -> dict:
    """The federated rounds on the server (what federate.run does in process), through federate/lifecycle.py.
    `client_states`: where the clients keep their personal states, when they share this machine's disk."""
    start = time.time()
    own_folder(output_dir)  # (a link is refused: nothing is written through it)
    method = check_settings(cfg)  # (a method whose clients do not communicate is refused here)
    if not cfg.cache_file:  # deployed with `flwr run`: the default path, as the in-process runner finds it
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.cache_file = str(cache_path(cfg))
    device = resolve_device(cfg.device)
    torch.set_flush_denormal(True)
    model = method.model(adapters.build(cfg.adapter, text_tower=cfg.text_adapter))
    server = strategy.build(cfg.strategy, cfg.aggregation)
    header = load_cache(cfg.cache_file, cfg.model.name, domains=())
    target, participants = target_and_participants(list(header.all_domains), cfg.target_domain, header.path)
    # the clients' splits, made as the in-process runner makes them (federate/run.py), for splits.json
    clients_cache = load_cache(cfg.cache_file, cfg.model.name, domains=tuple(participants))
    splits = make_clients(clients_cache, participants, cfg)
    sizes = {c.name: {p: len(c.rows[p]) for p in ("train", "val", "test")} for c in splits}
    # the server trains nothing: it evaluates the held-out domain only
    cache = load_cache(cfg.cache_file, cfg.model.name, domains=(target,) if target is not None else ())
    model.prepare(cache, cfg.model)
    target_set = domain_rows(cache, target, pooled_embeddings(cache, device)) if target is not None else None
    text = class_text(cache, device)
    init = {k: v.to(device) for k, v in adapters.init_params(model, cache.embed_dim, cfg.seed, text).items()}
    if target is not None and not method.target_models(method.split(init)[0], {}):
        raise ConfigError(f"method={method.name} evaluates the target domain with each client's own model, which "
                          "stays on its client under Flower; use target_domain=none, or backend=local")
    log.info("%s over Flower: target %s, participants %s", method.name, target, ", ".join(participants))
    nodes = Nodes(grid, cfg, participants, sizes, {c.name: c.domain for c in splits}, client_states)
    # each client keeps its own personal state (federate/flower/client_app.py); the server the shared one
    splits_text = json.dumps(splits_json(splits, clients_cache))
    identity = identity_of(cache, splits_text)
    identity["cache_checksums"] = {**clients_cache.checksums, **cache.checksums}  # what the splits came from too
    federation = Federation(cfg, method, nodes.clients, init, server, output_dir, target=target, keeps_personal=False,
                            inputs=identity, known_clients=list(sizes))
    server = privacy.wrap(federation)  # privacy=dp_client: DP-FedAvg around the strategy
    nodes.shipped["settings"] = ship(privacy.shipped_config(cfg, federation))  # (DP-SGD: the derived noise)
    if federation.private == "dp_client" and cfg.privacy.side == "client":
        nodes.clip_norm = float(cfg.privacy.clip_norm)
    write_text(output_dir / "splits.json", splits_text)
    names = [c.name for c in federation.clients]
    experiment = Experiment(
        cfg, method, federation, output_dir, cache.dataset_name, cache.model_name, model, server,
        cost_figures(method, federation, cache.model_num_parameters, federation.rounds), identity,
        len(target_set) if target_set is not None else None,
        save=lambda best: save_adapters(output_dir / "adapter.safetensors", method, names, best, cache.dataset_name,
                                        cache.model_name, cache.embed_dim, target, cfg),
        extras=lambda: {"backend": "flower"})
    return execute(experiment, FlowerBackend(nodes, federation, model, target_set, text, cache.logit_scale), start)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployed with `flwr run`: settings from the run config ([tool.flwr.app.config] and --run-config)."""
    try:
        cfg, output_dir = settings_from_run_config(dict(context.run_config))
        serve(PullingGrid(grid), cfg, output_dir)
    except ConfigError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
