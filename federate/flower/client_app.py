"""The Flower ClientApp: one SuperNode is one participating domain.

Node config: `partition` (a domain name) or `partition-id` (an index into the participants, as Flower's
simulation sets it), and optionally `cache-file` (where this machine keeps the cache; by default the
server's path). It reads only its own domain's embeddings, trains the adapter it is sent with the same
engine as the in-process runner, and replies with the adapter weights and metrics; it evaluates its
validation and test splits when asked.
"""
from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .. import strategy
from ..engine import ClientSets, autocast, client_generator, make_trainer
from ..evaluate import accuracies
from ..experiment import train_settings
from .task import client_adapter, client_data, client_method, domain_of_node, unship

app = ClientApp()


def client_of(msg: Message, context: Context):
    cfg = unship(str(msg.content["config"]["settings"]))
    participants = json.loads(str(msg.content["config"]["participants"]))
    domain = domain_of_node(context.node_config, participants)
    cache_file = context.node_config.get("cache-file") or cfg.cache_file
    client, text, scale = client_data(str(cache_file), cfg.model.name, domain, cfg.seed, cfg.split_file or "", cfg.device)
    return cfg, client, text, scale, client_adapter(cfg, str(cache_file), domain)


def received_state(msg: Message, device):
    return {k: v.to(device) for k, v in msg.content["arrays"].to_torch_state_dict().items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, client, text, scale, adapter = client_of(msg, context)
    method = client_method(cfg)
    glob = received_state(msg, client.train[0].device)
    state = strategy.stack(glob, 1)
    settings = train_settings(cfg, method)
    trainer = make_trainer(cfg.engine, adapter, ClientSets([client.train[0]], [client.train[1]]), text, scale, settings)
    loss = trainer.train(state, cfg.local_epochs, [client_generator(cfg.seed, client.name, int(msg.content["config"]["round"]))],
                         anchor=glob if settings.mu else None)
    reply = RecordDict({
        "arrays": ArrayRecord.from_torch_state_dict({k: v[0] for k, v in state.items()}),
        "metrics": MetricRecord({"num-examples": len(client.train[1]), "train_loss": float(loss[0])}),
        "config": ConfigRecord({"domain": client.name}),
    })
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, client, text, scale, adapter = client_of(msg, context)
    state = received_state(msg, client.train[0].device)
    with autocast(cfg.precision, client.train[0].device):  # as the in-process runner evaluates
        val, test = accuracies(adapter, [state, state], [client.val, client.test], text, scale)
    sizes = client.sizes()
    reply = RecordDict({
        "metrics": MetricRecord({"val_acc": val, "test_acc": test, "num-examples": sizes["val"]}),
        "config": ConfigRecord({"domain": client.name, "sizes": json.dumps(sizes)}),
    })
    return Message(reply, reply_to=msg)
