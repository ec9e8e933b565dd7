"""Accuracy: argmax over the classes of an adapter's logits (CLIP's cosine similarity for most)."""
from __future__ import annotations

import torch

from .adapters import Adapter

EVAL_ROWS = 8192  # rows evaluated at once


def pick(state: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Client i's adapter from a stacked [K, ...] state."""
    return {k: v[i] for k, v in state.items()}


@torch.no_grad()
def correct(adapter: Adapter, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
            text: torch.Tensor, scale: float) -> torch.Tensor:
    """Number of correct predictions (a device tensor) of one adapter's parameters on (x, y)."""
    if len(x) == 0:
        return torch.zeros((), device=x.device)
    # in blocks of rows: a 50k-row domain's activations (a few [N, d] tensors) never exist at once
    return sum((adapter.logits(params, x[i:i + EVAL_ROWS], text, scale).argmax(1) == y[i:i + EVAL_ROWS]).sum()
               for i in range(0, len(x), EVAL_ROWS))


def accuracies(adapter: Adapter, states: list, sets: list[tuple[torch.Tensor, torch.Tensor]], text: torch.Tensor,
               scale: float = 1.0) -> list[float]:
    """Accuracy of states[i] on sets[i], with a single host synchronisation."""
    hits = torch.stack([correct(adapter, s, x, y, text, scale).float() for s, (x, y) in zip(states, sets)])
    sizes = torch.tensor([max(1, len(y)) for _, y in sets], dtype=torch.float32)
    return (hits.cpu() / sizes).tolist()
