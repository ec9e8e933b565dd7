"""The Flower ClientApp: one SuperNode is one client of the run (federate/partition.py).

Node config: `partition` (a client name) or `partition-id` and `num-partitions` (an index into the run's
clients, as Flower's simulation sets them), optionally `cache-file` (where this machine keeps the cache;
by default the server's path) and `state-dir` (a folder for the client's personal state, so a resumed run
finds it: federate/flower/personal.py). With partition=domain it reads only its own domain's embeddings.
When queried it says which client it is and its split sizes. Asked to train, it runs the run's method's
local update (federate/methods/) on the shared state it is sent and its own personal state, with the same
engine as the in-process runner, and replies with what the method sends and its metrics; asked to
evaluate, it evaluates the model the method deploys on its validation and test splits (in fp32).
"""
from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from .. import adapters, methods, privacy
from ..engine import ClientSets, make_trainer
from ..evaluate import accuracies
from ..experiment import capped_batch
from ..training import LocalTraining
from .personal import PersonalStore
from .task import client_data, unship



def clip_when_asked(msg: Message, context: Context, call_next) -> Message:
    """privacy=dp_client side=client: Flower's `fixedclipping_mod` clips this client's update to the norm the
    server sends with a training message; other messages (and runs) pass as they are."""
    config = msg.content.config_records.get("config") if msg.metadata.message_type == MessageType.TRAIN else None
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[clip_when_asked])
LATEST = 2**62  # a round after every round: the latest personal state


class Client:
    """This node's client in one message's run: its data, the method and its model, its personal state."""

    def __init__(self, msg: Message, context: Context):
        config = msg.content["config"]
        self.settings_text = str(config["settings"])
        self.cfg = cfg = unship(self.settings_text)
        round_ = config["round"]  # a round's number, or the name of the method's exchange after the rounds
        self.round = round_ if isinstance(round_, str) else int(round_)
        participants = json.loads(str(config["participants"]))
        cache_file = context.node_config.get("cache-file") or cfg.cache_file
        self.client, self.text, self.scale, cache = client_data(str(cache_file), cfg, participants, context.node_config)
        self.method = methods.build(cfg.method)
        self.model = self.method.model(adapters.build(cfg.adapter, text_tower=cfg.text_adapter))
        self.model.prepare(cache, cfg.model)
        self.device = self.client.train.device
        init = adapters.init_params(self.model, cache.embed_dim, int(cfg.seed), self.text)
        _, personal = self.method.split({k: v.to(self.device) for k, v in init.items()})
        self.initial = {k: v.unsqueeze(0) for k, v in personal.items()}  # [1, ...], as the methods see M clients
        folder = context.node_config.get("state-dir") or config.get("state-dir") or None
        self.store = PersonalStore(context.state, folder, self.settings_text, self.client.name)

    def received(self, msg: Message) -> dict:
        return {k: v.to(self.device) for k, v in msg.content["arrays"].to_torch_state_dict().items()}

    def personal(self, before) -> dict:
        """The personal state before round `before` (the latest one in the exchange after the rounds)."""
        before = before if isinstance(before, int) else LATEST
        return self.store.state(before, self.initial, self.device) if self.initial else {}

    def training(self, what: str) -> LocalTraining:
        """This client's local training in the message's round (one client of the method's M); `what`: train
        (the local update) or deploy (the model it evaluates), which privacy=dpsgd budgets apart."""
        c, cfg = self.client, self.cfg
        settings = capped_batch(privacy.client_settings(self.method.train_settings(cfg), cfg), len(c.train))
        engines = {}

        def engine(s):
            if s not in engines:
                engines[s] = make_trainer(cfg.engine, self.model, ClientSets([c.train]), self.text, self.scale, s)
            return engines[s]

        return LocalTraining([(int(cfg.seed), c.name)], [len(c.train)], self.round, int(cfg.local_epochs), settings,
                             engine, budget=privacy.budget(cfg, self.method, what), rows=[c.train])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client this node is, and its split sizes (the server checks later replies against them)."""
    client = Client(msg, context).client
    reply = RecordDict({"config": ConfigRecord({"client": client.name, "domain": client.domain,
                                                "sizes": json.dumps(client.sizes())})})
    return Message(reply, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    me = Client(msg, context)
    personal = me.personal(before=me.round)
    update = me.method.local_update(me.training("train"), me.received(msg), personal)
    if personal and isinstance(me.round, int):
        me.store.keep(me.round, {k: v for k, v in personal.items()})
    loss = next(iter(update.losses.values()))
    reply = RecordDict({
        "arrays": ArrayRecord.from_torch_state_dict({k: v[0] for k, v in update.stacked.items()}),
        # (privacy=dpsgd: the training loss is not private and stays here)
        "metrics": MetricRecord({"num-examples": len(me.client.train),
                                 **({} if privacy.kind(me.cfg) == "dpsgd" else {"train_loss": float(loss)})}),
        "config": ConfigRecord({"client": me.client.name}),
    })
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    me = Client(msg, context)
    after = me.round + 1 if isinstance(me.round, int) else me.round
    state = me.method.deployed(me.training("deploy"), me.received(msg), me.personal(before=after))[0]
    c = me.client
    val, test = accuracies(me.model, [state, state], [c.val, c.test], me.text, me.scale)  # fp32
    reply = RecordDict({
        "metrics": MetricRecord({"val_acc": val, "test_acc": test, "num-examples": c.sizes()["val"]}),
        "config": ConfigRecord({"client": c.name}),
    })
    return Message(reply, reply_to=msg)
