"""FedCLIP (Lu et al. 2023) and FedProx (Li et al. 2020) on the cached embeddings.

- `fedclip`: FedAvg of the adapter (AttAI, FedCLIP's, by default): the base `Method`.
- `fedprox`: the same with (mu / 2) ||w - w_global||^2 added to each client's loss (`method.mu`; 0 is fedclip).
"""
from __future__ import annotations

from dataclasses import replace

from . import Method, number, register


@register("fedclip")
class FedCLIP(Method):
    pass


class Proximal:
    """A method with FedProx's term (mu / 2) ||w - w_global||^2 in its local training (`method.mu`)."""

    def __init__(self, mu: float = 0.01):
        super().__init__(dict(mu=number("mu", mu)))

    def train_settings(self, cfg):
        return replace(super().train_settings(cfg), mu=self.settings["mu"])


@register("fedprox", mu=0.01)
class FedProx(Proximal, Method):
    def local_update(self, train, shared, personal):
        return train.train(shared, personal, anchor=shared)
