"""`Rows`: some rows of the run's pooled embeddings (a client's split, a domain), held as indices.

A run holds the cache's embeddings once (federate/cache.py reads every domain into one array, which
`experiment.pooled_embeddings` puts on the device); a client's train/validation/test splits are index tensors into it,
and what trains or evaluates gathers a block of rows when it uses them. Copying each client's rows out
of the cache would hold the embeddings twice (on a DomainNet-sized cache, 1.2 GB more).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Rows:
    x: torch.Tensor  # the pooled embeddings [N, d]
    y: torch.Tensor  # their labels [N]
    index: torch.Tensor  # long [n]: which rows of x and y

    def __len__(self) -> int:
        return len(self.index)

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def labels(self) -> torch.Tensor:
        return self.y[self.index]

    def gather(self, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and labels of rows [start:stop] of this subset (copies of those rows only)."""
        index = self.index[start:stop]
        return self.x[index], self.y[index]

    def shares_pool(self, other: "Rows") -> bool:
        return self.x is other.x and self.y is other.y

    @staticmethod
    def of(x: torch.Tensor, y: torch.Tensor) -> "Rows":
        """Every row of (x, y)."""
        return Rows(x, y, torch.arange(len(y), device=x.device))


def concat(parts: list[Rows]) -> Rows:
    """The rows of several subsets of one pool, one after another."""
    first = parts[0]
    if not all(p.shares_pool(first) for p in parts):
        raise ValueError("rows of different pools cannot be concatenated without copying them; use Rows.of")
    return Rows(first.x, first.y, torch.cat([p.index for p in parts]) if len(parts) > 1 else first.index)


def pooled(features: list[torch.Tensor], labels: list[torch.Tensor]) -> list[Rows]:
    """Separate tensors (tests, one-off sets) as subsets of one pool: a copy, once."""
    x, y = torch.cat(features), torch.cat(labels)
    sizes = [len(f) for f in features]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [Rows(x, y, torch.arange(a, b, device=x.device)) for a, b in zip(starts, starts[1:])]
