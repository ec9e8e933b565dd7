"""Accuracy: argmax over classes of the cosine similarity between adapted image and class prompt features."""
from __future__ import annotations

import torch

from . import adapter as attai


def pick(state: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Client i's adapter from a stacked state, kept 3-d ([1, ...]) for the batched forward."""
    return {k: v[i:i + 1] for k, v in state.items()}


@torch.no_grad()
def correct(state: dict[str, torch.Tensor] | None, x: torch.Tensor, y: torch.Tensor, text: torch.Tensor):
    """Number of correct predictions (a device tensor) of one adapter ([1, ...] tensors; None = zero-shot)."""
    if len(x) == 0:
        return torch.zeros((), device=x.device)
    if state is None:
        image, texts = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(text, dim=-1)
    else:
        image = attai.forward(*attai.layers(state, "image"), x[None])[0][0]
        texts = attai.forward(*attai.layers(state, "text"), text[None])[0][0] if "text.0.weight" in state \
            else torch.nn.functional.normalize(text, dim=-1)
    return ((image @ texts.T).argmax(1) == y).sum()


def accuracies(states: list, sets: list[tuple[torch.Tensor, torch.Tensor]], text: torch.Tensor) -> list[float]:
    """Accuracy of states[i] on sets[i], with a single host synchronisation."""
    hits = torch.stack([correct(s, x, y, text).float() for s, (x, y) in zip(states, sets)])
    sizes = torch.tensor([max(1, len(y)) for _, y in sets], dtype=torch.float32)
    return (hits.cpu() / sizes).tolist()
