"""The Flower ClientApp: one SuperNode is one client of the run (federate/partition.py).

Node config: `partition` (a client name) or `partition-id` and `num-partitions` (an index into the run's
clients, as Flower's simulation sets them), and optionally `cache-file` (where this machine keeps the
cache; by default the server's path). With partition=domain it reads only its own domain's embeddings.
When queried it says which client it is and its split sizes; it trains the adapter it is sent with the
same engine as the in-process runner and replies with the adapter weights and metrics; it evaluates its
validation and test splits (in fp32) when asked.
"""
from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .. import strategy
from ..engine import ClientSets, client_generator, make_trainer
from ..evaluate import accuracies
from ..experiment import capped_batch, train_settings
from .task import client_adapter, client_data, client_method, unship

app = ClientApp()


def client_of(msg: Message, context: Context):
    cfg = unship(str(msg.content["config"]["settings"]))
    participants = json.loads(str(msg.content["config"]["participants"]))
    cache_file = context.node_config.get("cache-file") or cfg.cache_file
    client, text, scale, cache = client_data(str(cache_file), cfg, participants, context.node_config)
    return cfg, client, text, scale, cache


def received_state(msg: Message, device):
    return {k: v.to(device) for k, v in msg.content["arrays"].to_torch_state_dict().items()}


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client this node is, and its split sizes (the server checks later replies against them)."""
    cfg, client, *_ = client_of(msg, context)
    reply = RecordDict({"config": ConfigRecord({"client": client.name, "domain": client.domain,
                                                "sizes": json.dumps(client.sizes())})})
    return Message(reply, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, client, text, scale, cache = client_of(msg, context)
    method, adapter = client_method(cfg), client_adapter(cfg, cache)
    glob = received_state(msg, client.train.device)
    state = strategy.stack(glob, 1)
    settings = capped_batch(train_settings(cfg, method), len(client.train))
    trainer = make_trainer(cfg.engine, adapter, ClientSets([client.train]), text, scale, settings)
    loss = trainer.train(state, cfg.local_epochs, [client_generator(cfg.seed, client.name, int(msg.content["config"]["round"]))],
                         anchor=glob if settings.mu else None)
    reply = RecordDict({
        "arrays": ArrayRecord.from_torch_state_dict({k: v[0] for k, v in state.items()}),
        "metrics": MetricRecord({"num-examples": len(client.train), "train_loss": float(loss[0])}),
        "config": ConfigRecord({"client": client.name}),
    })
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, client, text, scale, cache = client_of(msg, context)
    state = received_state(msg, client.train.device)
    val, test = accuracies(client_adapter(cfg, cache), [state, state], [client.val, client.test], text, scale)  # fp32
    reply = RecordDict({
        "metrics": MetricRecord({"val_acc": val, "test_acc": test, "num-examples": client.sizes()["val"]}),
        "config": ConfigRecord({"client": client.name}),
    })
    return Message(reply, reply_to=msg)
