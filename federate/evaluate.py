"""Accuracy: argmax over the classes of an adapter's logits (CLIP's cosine similarity for most)."""
from __future__ import annotations

import torch

from .adapters import Adapter
from .rows import Rows, concat

EVAL_ROWS = 2048  # rows evaluated at once: their activations (4 MB each at d = 512) stay in cache, 1.3x faster than 8192


def pick(state: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Client i's adapter from a stacked [K, ...] state."""
    return {k: v[i] for k, v in state.items()}


@torch.no_grad()
def correct(adapter: Adapter, params: dict[str, torch.Tensor], sets: list[Rows], text: torch.Tensor,
            scale: float) -> torch.Tensor:
    """Correct predictions of one adapter's parameters on each of `sets` (rows of one pool; a device tensor
    [len(sets)]): one pass over their rows, in blocks (a 50k-row domain's activations never exist at
    once, and 300 small clients evaluated with the global adapter cost what their rows cost)."""
    rows = concat(sets)
    owner = torch.repeat_interleave(torch.arange(len(sets)), torch.tensor([len(s) for s in sets])).to(rows.device)
    counts = torch.zeros(len(sets), dtype=torch.long, device=rows.device)
    for i in range(0, len(rows), EVAL_ROWS):
        x, y = rows.gather(i, i + EVAL_ROWS)
        hit = adapter.logits(params, x, text, scale).argmax(1) == y
        counts += torch.bincount(owner[i:i + EVAL_ROWS][hit], minlength=len(sets))
    return counts


def accuracies(adapter: Adapter, states: list, sets: list[Rows], text: torch.Tensor, scale: float = 1.0) -> list[float]:
    """Accuracy of states[i] on sets[i], with a single host synchronisation. Sets evaluated with the same
    adapter object (every client with the global adapter) share one pass."""
    by_state: dict[int, list[int]] = {}
    for i, state in enumerate(states):
        by_state.setdefault(id(state), []).append(i)
    hits = [None] * len(sets)
    for members in by_state.values():
        counts = correct(adapter, states[members[0]], [sets[i] for i in members], text, scale)
        for j, i in enumerate(members):
            hits[i] = counts[j]
    sizes = torch.tensor([max(1, len(s)) for s in sets], dtype=torch.float32)
    return (torch.stack(hits).cpu().float() / sizes).tolist() if sets else []
