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


@torch.no_grad()
def correct_with_heads(model, states: list[dict], sets: list[Rows], scale: float) -> torch.Tensor:
    """Correct predictions of states that share their body (a heads model, federate/heads.py: FedPer's
    clients) on each of `sets`: the features of all rows in one pass, then each state's own heads."""
    rows = concat(sets)
    bounds = torch.tensor([0, *[len(s) for s in sets]]).cumsum(0).tolist()
    counts = torch.zeros(len(sets), dtype=torch.long, device=rows.device)
    for i in range(0, len(rows), EVAL_ROWS):
        x, y = rows.gather(i, i + EVAL_ROWS)
        f = model.features(states[0], x)
        for j, state in enumerate(states):  # the members whose rows fall in this block
            lo, hi = max(bounds[j], i) - i, min(bounds[j + 1], i + len(x)) - i
            if lo < hi:
                counts[j] += (model.head_logits(state, f[lo:hi], scale).argmax(1) == y[lo:hi]).sum()
    return counts


def accuracies(adapter: Adapter, states: list, sets: list[Rows], text: torch.Tensor, scale: float = 1.0) -> list[float]:
    """Accuracy of states[i] on sets[i], with a single host synchronisation. Sets evaluated with the same
    adapter object (every client with the global adapter) share one pass; so do the states of a heads
    model that share their body's tensors (each client's own head on the shared body)."""
    by_state: dict = {}
    for i, state in enumerate(states):
        key = tuple(id(state[k]) for k in adapter.body_keys(state)) if hasattr(adapter, "body_keys") else id(state)
        by_state.setdefault(key, []).append(i)
    hits = [None] * len(sets)
    for members in by_state.values():
        if len({id(states[i]) for i in members}) > 1:
            counts = correct_with_heads(adapter, [states[i] for i in members], [sets[i] for i in members], scale)
        else:
            counts = correct(adapter, states[members[0]], [sets[i] for i in members], text, scale)
        for j, i in enumerate(members):
            hits[i] = counts[j]
    sizes = torch.tensor([max(1, len(s)) for s in sets], dtype=torch.float32)
    return (torch.stack(hits).cpu().float() / sizes).tolist() if sets else []
