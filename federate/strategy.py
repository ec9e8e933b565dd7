"""Server side: averaging client adapters (FedAvg-style), named as in Flower's strategies."""
from __future__ import annotations

import torch

AGGREGATIONS = ("uniform", "samples")


def client_weights(num_examples: list[int], how: str) -> torch.Tensor:
    """uniform: 1/K each (the reference code); samples: n_k / sum n (paper eq. 9, FedAvg)."""
    n = torch.tensor(num_examples, dtype=torch.float64)
    w = torch.full_like(n, 1 / len(n)) if how == "uniform" else n / n.sum()
    return w.float()


def aggregate_train(stacked: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weighted mean over the leading (client) dimension of every tensor."""
    w = weights.to(next(iter(stacked.values())).device)
    return {k: torch.tensordot(w, v, dims=1) for k, v in stacked.items()}


def configure_train(stacked: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor]) -> None:
    """Every client starts the round from the global adapter."""
    for k, v in stacked.items():
        v.copy_(global_state[k].expand_as(v))


def stack(state: dict[str, torch.Tensor], clients: int) -> dict[str, torch.Tensor]:
    return {k: v.expand(clients, *v.shape).clone() for k, v in state.items()}
