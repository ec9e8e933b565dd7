"""Server strategies (Hydra group `strategy`): how the server turns the clients' adapters into the next
global adapter. Names follow Flower's strategies; the in-process runner and the Flower ServerApp use the
same objects.

- `fedavg`: the weighted mean of the clients' adapters (`aggregation=uniform`, the reference code, or
  `samples`, weighted by training rows: paper eq. 9, FedAvg).
- `fedavgm` and `fedadam` (Reddi et al. 2021, "Adaptive Federated Optimization"): the mean client update
  `delta = mean - global` is a pseudo-gradient for a server optimiser, momentum SGD or Adam.
"""
from __future__ import annotations

import math

import torch

from .errors import ConfigError

AGGREGATIONS = ("uniform", "samples")
STRATEGIES: dict[str, type["FedAvg"]] = {}

State = dict[str, torch.Tensor]


def register(name: str):
    def add(cls):
        cls.name = name
        STRATEGIES[name] = cls
        return cls
    return add


def client_weights(num_examples: list[int], how: str) -> torch.Tensor:
    """uniform: 1/K each (the reference code); samples: n_k / sum n (paper eq. 9, FedAvg)."""
    n = torch.tensor(num_examples, dtype=torch.float64)
    w = torch.full_like(n, 1 / len(n)) if how == "uniform" else n / n.sum()
    return w.float()


class WeightedSum:
    """sum_k w_k state_k, added one client at a time in the clients' order. A runner that trains clients one
    after another adds each as it finishes (federate/engine.py SequentialTrainer.train_mean), holding one
    client's adapter at a time; `weighted_mean` adds stacked clients the same way, so both give the same bits."""

    def __init__(self, like: State):
        self.sum = {k: torch.zeros_like(v) for k, v in like.items()}

    def add(self, state: State, weight: float) -> None:
        torch._foreach_add_(list(self.sum.values()), [state[k] for k in self.sum], alpha=float(weight))


def weighted_mean(stacked: State, weights: torch.Tensor) -> State:
    """Weighted mean over the leading (client) dimension of every tensor."""
    total = WeightedSum({k: v[0] for k, v in stacked.items()})
    for i, w in enumerate(weights.tolist()):
        total.add({k: v[i] for k, v in stacked.items()}, w)
    return total.sum


def check_server_lr(lr: float) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"strategy.server_lr must be > 0 and finite, not {lr}")


def check_decay(key: str, rate: float) -> None:
    """A momentum or moment decay rate: in [0, 1), or the server's state grows without bound."""
    if not 0 <= rate < 1:  # also NaN
        raise ConfigError(f"{key} must be in [0, 1), not {rate}")


@register("fedavg")
class FedAvg:
    def __init__(self, aggregation: str = "uniform"):
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be uniform or samples, not {aggregation!r}")
        self.aggregation = aggregation
        self.settings: dict = {}

    MOMENTS: tuple[str, ...] = ()  # the server optimiser's state: what a checkpoint keeps (federate/checkpoint.py)
    # The built-in strategies read only the weighted mean of the clients' adapters, so a runner may hand
    # them that mean, added up as the clients train (one client's adapter in memory at a time: many
    # clients cost what their rows cost). A strategy that needs each client's adapter (a robust
    # aggregation, say) sets this, and gets them stacked [K, ...].
    reads_each_client = False

    def moments(self) -> dict[str, State]:
        return {name: getattr(self, name) for name in self.MOMENTS if getattr(self, name) is not None}

    def load_moments(self, moments: dict[str, State]) -> None:
        for name, state in moments.items():
            setattr(self, name, state)

    def aggregate_train(self, global_state: State, stacked: State, num_examples: list[int]) -> State:
        """The next global adapter from the clients' adapters (stacked [K, ...]) after local training."""
        return weighted_mean(stacked, client_weights(num_examples, self.aggregation))

    def describe(self) -> dict:
        return {"name": self.name, "aggregation": self.aggregation, **self.settings}


@register("fedavgm")
class FedAvgM(FedAvg):
    """Server momentum: v = momentum * v + delta; global += server_lr * v (momentum 0, lr 1 is FedAvg)."""

    MOMENTS = ("velocity",)

    def __init__(self, aggregation="uniform", server_lr: float = 1.0, momentum: float = 0.9):
        super().__init__(aggregation)
        self.settings = {"server_lr": float(server_lr), "momentum": float(momentum)}
        check_server_lr(self.settings["server_lr"])
        check_decay("strategy.momentum", self.settings["momentum"])
        self.velocity: State | None = None

    def aggregate_train(self, global_state, stacked, num_examples):
        delta = {k: v - global_state[k] for k, v in super().aggregate_train(global_state, stacked, num_examples).items()}
        if self.velocity is None:
            self.velocity = {k: torch.zeros_like(v) for k, v in delta.items()}
        for k, d in delta.items():
            self.velocity[k].mul_(self.settings["momentum"]).add_(d)
        return {k: v + self.settings["server_lr"] * self.velocity[k] for k, v in global_state.items()}


@register("fedadam")
class FedAdam(FedAvg):
    """Adam on the pseudo-gradient, as in Reddi et al. 2021 (no bias correction): m = b1 m + (1 - b1) delta,
    v = b2 v + (1 - b2) delta^2, global += server_lr * m / (sqrt(v) + tau)."""

    MOMENTS = ("m", "v")

    def __init__(self, aggregation="uniform", server_lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3):
        super().__init__(aggregation)
        self.settings = {"server_lr": float(server_lr), "beta1": float(beta1), "beta2": float(beta2), "tau": float(tau)}
        check_server_lr(self.settings["server_lr"])
        check_decay("strategy.beta1", self.settings["beta1"])
        check_decay("strategy.beta2", self.settings["beta2"])
        if not (math.isfinite(self.settings["tau"]) and self.settings["tau"] > 0):
            raise ConfigError(f"strategy.tau must be > 0 and finite (it keeps the update's denominator off zero), not {tau}")
        self.m: State | None = None
        self.v: State | None = None

    def aggregate_train(self, global_state, stacked, num_examples):
        s = self.settings
        delta = {k: v - global_state[k] for k, v in super().aggregate_train(global_state, stacked, num_examples).items()}
        if self.m is None:
            self.m = {k: torch.zeros_like(v) for k, v in delta.items()}
            self.v = {k: torch.zeros_like(v) for k, v in delta.items()}
        for k, d in delta.items():
            self.m[k].mul_(s["beta1"]).add_(d, alpha=1 - s["beta1"])
            self.v[k].mul_(s["beta2"]).addcmul_(d, d, value=1 - s["beta2"])
        return {k: w + s["server_lr"] * self.m[k] / (self.v[k].sqrt() + s["tau"]) for k, w in global_state.items()}


def build(cfg_strategy, aggregation: str) -> FedAvg:
    settings = {k: v for k, v in dict(cfg_strategy).items() if k != "name"}
    name = cfg_strategy["name"]
    if name not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(sorted(STRATEGIES))}, not {name!r}")
    try:
        return STRATEGIES[name](aggregation, **settings)
    except TypeError as e:
        raise ConfigError(f"strategy {name}: {e}") from None


def configure_train(stacked: State, global_state: State) -> None:
    """Every client starts the round from the global adapter."""
    for k, v in stacked.items():
        v.copy_(global_state[k].expand_as(v))


def stack(state: State, clients: int) -> State:
    return {k: v.expand(clients, *v.shape).clone() for k, v in state.items()}
