"""Statistics of features per class, what FedProto, CCVR and FedPFT clients send instead of (or besides)
weights, and a linear head trained on rows of features (CCVR's calibration, FedPFT's server-side head).

- `features`: a model's features (`model.features`: what its head reads) of some rows, in blocks.
- `class_means`: per-class row counts and mean features of each client (FedProto's prototypes).
- `Moments` and `class_moments`: per-class count, mean and covariance of one client's features; `merge`
  pools two sets of moments exactly (Chan et al.'s pairwise update), in the order given, so a server that
  pools M clients' moments one after another and a runner that pools them as they are computed get the
  same numbers.
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


def class_means(model, states: list[State], rows: list[Rows], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each client's training rows per class and mean feature per class, [M, C] and [M, C, d] (zeros
    where a client has no row of the class): client i's features under `states[i]`."""
    counts, means = [], []
    for state, r in zip(states, rows):
        total, n = None, torch.zeros(classes, device=r.device)
        for f, y in features(model, state, r):
            if total is None:
                total = f.new_zeros(classes, f.shape[1])
            total.index_add_(0, y, f)
            n += torch.bincount(y, minlength=classes)
        counts.append(n)
        means.append(total / n.clamp_min(1)[:, None])
    return torch.stack(counts), torch.stack(means)


@dataclass
class Moments:
    """Per class: rows `count` [C], `mean` [C, d] and `m2` [C, d, d], the sum of the outer products of the
    rows' deviations from their class mean (covariance = m2 / (count - 1)); float64."""
    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    def covariance(self) -> torch.Tensor:
        """The unbiased covariance of each class, [C, d, d] (zeros for classes of fewer than two rows)."""
        return torch.where((self.count >= 2)[:, None, None], self.m2 / (self.count - 1).clamp_min(1)[:, None, None], 0.0)

    @classmethod
    def of(cls, count: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor) -> "Moments":
        """From what a client sends: count, mean and unbiased covariance per class (any float dtype)."""
        count, mean, covariance = count.double(), mean.double(), covariance.double()
        return cls(count, mean, covariance * (count - 1).clamp_min(0)[:, None, None])


def class_moments(model, state: State, rows: Rows, classes: int) -> Moments:
    """One client's per-class moments of its features under `state` (the deviations from each class's
    mean are summed directly, not as E[xx^T] - mean mean^T, which loses digits)."""
    parts = list(features(model, state, rows))
    f, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    d = f.shape[1]
    count = torch.bincount(y, minlength=classes).double()
    mean = torch.zeros(classes, d, dtype=torch.float64, device=f.device).index_add_(0, y, f.double())
    mean /= count.clamp_min(1)[:, None]
    m2 = torch.zeros(classes, d, d, dtype=torch.float64, device=f.device)
    order = torch.argsort(y, stable=True)
    ends = torch.cumsum(count.long(), 0).tolist()
    for c, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
        if end - start >= 2:
            g = f[order[start:end]] - mean[c].float()
            m2[c] = (g.T @ g).double()
    return Moments(count, mean, m2)


def merge(a: Moments, b: Moments) -> Moments:
    """The moments of the union of two sets of rows, class by class (exact: Chan et al. 1979)."""
    n = a.count + b.count
    share = torch.where(n > 0, b.count / n.clamp_min(1), 0.0)
    delta = b.mean - a.mean
    mean = a.mean + delta * share[:, None]
    m2 = a.m2 + b.m2 + torch.einsum("ci,cj->cij", delta, delta) * (a.count * share)[:, None, None]
    return Moments(n, mean, m2)


def gaussian_rows(mean: torch.Tensor, covariance: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n samples of N(mean, covariance) [n, d] (float64), mean + L z with L the Cholesky factor. A
    covariance from fewer rows than dimensions is singular: the smallest diagonal jitter that lets the
    factorisation through (from 1e-10 of its mean variance up) is added; a zero covariance gives the mean."""
    d = mean.shape[0]
    z = torch.randn(n, d, generator=generator, dtype=torch.float64).to(mean.device)
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
