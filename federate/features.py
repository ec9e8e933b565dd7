"""Statistics of features per class, what CCVR and FedPFT clients send besides (or instead of) weights, and
a linear head trained on rows of features (CCVR's calibration, FedPFT's server-side head).

- `features`: a model's features (`model.features`: what its head reads) of some rows, in blocks.
- `Moments`, `class_moments` and `pool`: per-class count, mean and covariance of features; `pool` pools
  clients' moments exactly, as a server pools what each client sends, and `class_moments` computes the
  same pooled moments of several clients' rows in one pass (a run in one process sends nothing).
- `gaussian_rows`: samples of N(mean, covariance).
- `train_linear`: shuffled mini-batches of cross-entropy on `scale * (x W^T + b)` with a torch optimiser
  (the batches a DataLoader with shuffle=True gives, the last partial one too), the gradient written out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .evaluate import EVAL_ROWS
from .rows import Rows

State = dict[str, torch.Tensor]


@torch.no_grad()
def features(model, state: State, rows: Rows, block: int = EVAL_ROWS):
    """(features [n, d], labels [n]) of `rows` under `state`, in blocks of `block` rows (fp32)."""
    for i in range(0, len(rows), block):
        x, y = rows.gather(i, i + block)
        yield model.features(state, x).float(), y


@dataclass
class Moments:
    """Per class: rows `count` [..., C], `mean` [..., C, d] and `m2` [..., C, d, d], the sum of the outer
    products of the rows' deviations from their class mean (covariance = m2 / (count - 1)); float64. A
    leading dimension holds clients."""
    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    def covariance(self) -> torch.Tensor:
        """The unbiased covariance of each class (zeros for classes of fewer than two rows)."""
        return torch.where((self.count >= 2)[..., None, None], self.m2 / (self.count - 1).clamp_min(1)[..., None, None],
                           0.0)

    @classmethod
    def of(cls, count: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor) -> "Moments":
        """From what clients send: count, mean and unbiased covariance per class (any float dtype)."""
        count, mean, covariance = count.double(), mean.double(), covariance.double()
        return cls(count, mean, covariance * (count - 1).clamp_min(0)[..., None, None])


def pool(clients: Moments) -> Moments:
    """The moments of all the clients' rows (leading dimension: clients), class by class, exactly: the
    clients' own scatter plus the scatter of their means around the pooled one (the pooled covariance of
    Luo et al. 2021, eq. 4, for unbiased client covariances)."""
    count = clients.count.sum(0)
    mean = (clients.count[..., None] * clients.mean).sum(0) / count.clamp_min(1)[:, None]
    apart = clients.mean - mean
    between = torch.einsum("kc,kci,kcj->cij", clients.count, apart, apart)
    return Moments(count, mean, clients.m2.sum(0) + between)


def class_moments(model, state: State, rows: list[Rows], classes: int) -> Moments:
    """The per-class moments of the features of some clients' rows under one `state`, pooled (one client's
    own, given its rows alone): each client's count and mean per class, then the deviations of every row
    from its client's class mean in one product per class (summed directly, not as E[xx^T] - mean mean^T,
    which loses digits), then `pool`'s scatter of the clients' means. What a server pools from the
    clients' messages, computed in one pass over their rows."""
    from .rows import concat

    parts = list(features(model, state, concat(rows)))
    f, y = torch.cat([p[0] for p in parts]).double(), torch.cat([p[1] for p in parts])
    owner = torch.repeat_interleave(torch.arange(len(rows), device=y.device),
                                    torch.tensor([len(r) for r in rows], device=y.device))
    cell = owner * classes + y  # (client, class)
    count = torch.bincount(cell, minlength=len(rows) * classes).double().view(len(rows), classes)
    mean = torch.zeros(len(rows) * classes, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, cell, f)
    mean = (mean.view(len(rows), classes, -1) / count.clamp_min(1)[..., None])
    g = f - mean.view(len(rows) * classes, -1)[cell]
    m2 = torch.zeros(classes, f.shape[1], f.shape[1], dtype=f.dtype, device=f.device)
    for c in torch.unique(y).tolist():
        mine = g[y == c]
        m2[c] = mine.T @ mine
    return pool(Moments(count, mean, m2[None]))  # (m2: the clients' own scatters, summed)


def gaussian_rows(mean: torch.Tensor, covariance: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n samples of N(mean, covariance) [n, d] (float64), mean + L z with L the Cholesky factor. A
    covariance from fewer rows than dimensions is singular: the smallest diagonal jitter that lets the
    factorisation through (from 1e-10 of its mean variance up) is added; a zero covariance gives the mean."""
    d = mean.shape[0]
    z = torch.randn(n, d, generator=generator).double().to(mean.device)
    scale = float(covariance.diagonal().mean())
    if scale <= 0:
        return mean.expand(n, d).clone()
    eye = torch.eye(d, dtype=covariance.dtype, device=covariance.device)
    jitter = 0.0
    while True:
        factor, info = torch.linalg.cholesky_ex(covariance + jitter * eye)
        if int(info) == 0:
            return mean + z @ factor.T
        jitter = scale * 1e-10 if jitter == 0 else jitter * 10


def train_linear(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
                 batch_size: int, optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
                 generator: torch.Generator, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head, logits = scale * (x W^T + b), trained from (weight, bias) on rows x [n, d] with labels
    y by cross-entropy, the mean over each batch: `epochs` passes, each over a fresh permutation of the
    rows (torch.randperm with `generator`) cut into batches of `batch_size` (the last one partial), one
    optimiser step per batch. `optimizer(params)` makes the optimiser (a fresh one). The batches are those of
    a torch DataLoader(shuffle=True, generator=generator) over the rows, which draws from the generator, each
    epoch, its iterator's base seed, the permutation, and a second, unused permutation as the epoch ends: so
    does this. Returns the trained (weight, bias), new tensors."""
    W, b = weight.detach().clone().float(), bias.detach().clone().float()
    W.grad, b.grad = torch.zeros_like(W), torch.zeros_like(b)
    opt = optimizer([W, b])
    n = len(y)
    rows = torch.arange(batch_size, device=x.device)
    with torch.no_grad():
        for _ in range(epochs):
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # (the DataLoader iterator's base seed)
            order = torch.randperm(n, generator=generator).to(x.device)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                xb, yb = x[idx], y[idx]
                p = torch.softmax(torch.addmm(b, xb, W.T).mul_(scale), dim=1)
                p[rows[:len(yb)], yb] -= 1  # d loss / d logits = (softmax - onehot) / B, times the scale
                p.mul_(scale / len(yb))
                torch.mm(p.T, xb, out=W.grad)
                torch.sum(p, 0, out=b.grad)
                opt.step()
            torch.randperm(n, generator=generator)  # (RandomSampler's unused last draw of the epoch)
    return W.detach(), b.detach()


def fused(device: torch.device) -> dict:
    """torch's fused optimiser kernels where it has them (CPU and CUDA)."""
    return {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {}
