"""`LocalTraining`: what a method's local update (federate/methods/) can ask of M clients' training rows in
one round, whatever holds them (a round's sampled clients in process, the slots of a grouped sweep, the one
client of a Flower ClientApp); and `Update`, what the clients send back.

A client's model is `{**shared, **personal_i}`: the shared state every client starts the round from, and
its own personal state (a FedPer head, a Ditto model), which the method keeps. `train` trains some keys of
it for some epochs (`keys`: the others stay frozen; `phase`: a name that gives the phase its own batch
order; `anchor` and `settings.mu`: a proximal term towards another state), updates the personal keys in
place and returns the shared keys as the clients send them. Where the strategy reads only the weighted
mean of the updates and every client starts from one shared state, the engine adds each client to that
mean as it finishes (federate/engine.py SequentialTrainer.train_mean) instead of holding M models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .engine import client_generator
from .errors import ConfigError

State = dict[str, torch.Tensor]


@dataclass
class Update:
    """What the sampled units send after local training ([M, ...] per tensor, in the order of the sample;
    or one pre-averaged state [1, ...] with num_examples [1]), their training rows and mean losses."""
    stacked: State
    num_examples: list[int]
    losses: dict[str, float] = field(default_factory=dict)


class LocalTraining:
    """Local training of M clients in one round.

    Parameters
    ----------
    clients: (seed, unit name) of each client: its batch order is `client_generator(seed, name, round)`.
    sizes: training rows of each client (what FedAvg weighs by).
    round_: the round (or a tag such as "finetune") the batch orders are drawn for.
    epochs: local epochs (`local_epochs`).
    settings: the method's TrainSettings.
    trainer: settings -> an engine over these clients' rows (federate/engine.py make_trainer), kept by the caller.
    weights: the strategy's client weights when it reads only their weighted mean (so updates may be added
        up as clients train); None when it reads each client's update.
    shared_is_common: the `shared` state given to `train` is one state for all clients (not stacked [M, ...]).
    labels: the keys of `Update.losses` (default: the unit names; a grouped sweep's slots share names).
    budget: under privacy=dpsgd, the epochs over each client's rows its privacy accounting counts for this
        training (`Method.private_epochs`); `train` refuses to go beyond. None: no limit.
    rows: each client's training rows (federate/rows.py), for a local update that computes statistics of
        them (FedProto's prototypes, CCVR's and FedPFT's class statistics) rather than training.
    """

    def __init__(self, clients: list[tuple[int, str]], sizes: list[int], round_, epochs: int, settings,
                 trainer: Callable, weights: list[float] | None = None, shared_is_common: bool = True,
                 labels: list[str] | None = None, budget: int | None = None, rows: list | None = None):
        self.clients, self.sizes, self.round, self.epochs = clients, list(sizes), round_, int(epochs)
        self.settings, self._trainer, self.weights = settings, trainer, weights
        self.shared_is_common = shared_is_common
        self.labels = labels or [name for _, name in clients]
        self.rows = rows
        self.budget, self.epochs_trained = budget, 0

    def __len__(self) -> int:
        return len(self.clients)

    @property
    def names(self) -> list[str]:
        return [name for _, name in self.clients]

    def generators(self, phase: str = "") -> list[torch.Generator]:
        tag = self.round if not phase else f"{self.round}/{phase}"
        return [client_generator(seed, name, tag) for seed, name in self.clients]

    def train(self, shared: State, personal: State, *, keys=None, epochs: int | None = None, anchor: State | None = None,
              settings=None, phase: str = "", send: bool = True, each: bool = False) -> Update:
        """Train each client's model `{**shared, **personal_i}` (the `keys` that train: all by default) for
        `epochs` (`local_epochs` by default) and return the shared keys as sent: their weighted mean where
        the strategy allows it, each client's with each=True, none with send=False. Personal keys are
        updated in place. `anchor`: the state the proximal term (settings.mu) pulls towards."""
        settings = settings or self.settings
        epochs = self.epochs if epochs is None else int(epochs)
        self.epochs_trained += epochs
        if self.budget is not None and self.epochs_trained > self.budget:
            raise ConfigError(f"round {self.round}: the method trains {self.epochs_trained} epochs on a client's rows, "
                              f"more than the {self.budget} its privacy accounting counts (Method.private_epochs); "
                              "the run stops rather than spend privacy it does not record")
        trainer = self._trainer(settings)
        gens = self.generators(phase)
        own = [k for k in shared if k not in personal]  # the shared keys each client sends
        mean = send and bool(own) and self.weights is not None  # the strategy takes their weighted mean
        if self.shared_is_common and hasattr(trainer, "train_mean") and not each and (mean or not (send and own)):
            # one client at a time from the one shared state, each added to the mean as it finishes: never
            # M copies of the shared keys
            total, losses = trainer.train_mean({k: shared[k] for k in own}, epochs, gens,
                                               self.weights if mean else None, anchor, personal=personal, keys=keys)
            if mean:
                return Update({k: total[k].unsqueeze(0) for k in own}, [1], self.named(losses))
            return Update({}, self.sizes, self.named(losses))
        m = len(self)
        state = {k: (shared[k].expand(m, *shared[k].shape) if self.shared_is_common else shared[k]).clone() for k in own}
        state.update(personal)  # trained in place
        losses = trainer.train(state, epochs, gens, anchor=anchor, keys=keys)
        return Update({k: state[k] for k in own} if send else {}, self.sizes, self.named(losses))

    def state_of(self, shared: State, personal: State, i: int) -> State:
        """Client i's model: the shared state (its own row where `shared` is stacked per client) with its
        personal state."""
        mine = shared if self.shared_is_common else {k: v[i] for k, v in shared.items()}
        return {**mine, **{k: v[i] for k, v in personal.items()}}

    def named(self, losses: torch.Tensor) -> dict[str, float]:
        return dict(zip(self.labels, losses.tolist()))
