"""Local training, evaluation and the server's running average for models trained on images.

- `client_batches`: the cached engines' batch order (`federate.engine.client_generator(seed, client,
  round)`, a fresh permutation per local epoch, batches of `batch_size`, a last batch of fewer than 2
  images skipped), as (domain, image, augmentation seed) keys.
- `local_update`: one client's local training from the global state, with a fresh optimiser
  (`federate.backbone.optim`: the `optimizer` group, default FedCLIP's
  `Adam(lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)`); FedProx adds mu (w - w_global) to every
  gradient, the gradient of (mu / 2) ||w - w_global||^2 (mu = 0 adds nothing).
  On CUDA the forward and backward run under bf16 autocast (fp32 master weights).
- `RunningMean`: the server's weighted mean of the clients' states, one client at a time (one running sum
  instead of K copies); it equals `strategy.FedAvg`'s weighted mean of the stacked states (tested).
- `accuracy`: batched evaluation under `inference_mode`, in fp32.
"""
from __future__ import annotations

import zlib
from contextlib import nullcontext

import torch

from ..engine import TrainSettings, batches_per_epoch, client_generator
from .optim import fresh_optimizer


def client_batches(train_rows, domain_index: int, name: str, seed: int, round_, batch_size: int,
                   epochs: int) -> list[list[tuple[int, int, int]]]:
    """The batches of one client in one round, in the order of the cached engines' schedule, as
    (domain, image, augmentation seed) keys: the seed of an image's random training transform depends on
    (seed, client, round, epoch, image) only, so it does not depend on the DataLoader's workers."""
    n = len(train_rows)
    generator = client_generator(seed, name, round_)
    nb = batches_per_epoch(n, batch_size)
    used = min(n, nb * batch_size)  # drops a lone last row
    out = []
    for e in range(epochs):
        rows = torch.randperm(n, generator=generator)[:used].tolist()
        keys = [(domain_index, int(train_rows[r]), augment_seed(seed, name, round_, e, int(train_rows[r])))
                for r in rows]
        out += [keys[s:s + batch_size] for s in range(0, used, batch_size)]
    return out


def augment_seed(seed: int, name: str, round_, epoch: int, image: int) -> int:
    return zlib.crc32(f"{seed}/{name}/{round_}/{epoch}/{image}/augment".encode())


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def dropout_seed(seed: int, name: str, round_) -> int:
    """The seed of the random ops (dropout) of one client's local update: reproducible per client and round."""
    return zlib.crc32(f"{seed}/{name}/{round_}/dropout".encode())


def local_update(model, batches, settings: TrainSettings, device: torch.device,
                 anchor: dict[str, torch.Tensor] | None = None, rng_seed: int | None = None) -> float:
    """Train `model` in place over `batches` (an iterable of (pixels, labels) on the device); return the
    mean training loss (without the proximal term)."""
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = fresh_optimizer(model, named, settings)
    anchors = [anchor[n] for n, _ in named] if settings.mu and anchor is not None else None
    total, steps = torch.zeros((), device=device), 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        for pixels, labels in batches:
            with autocast(device):
                loss = model.loss(pixels, labels)
            opt.zero_grad(set_to_none=False)  # keeps the gradient buffers: no 600 MB re-allocation per step
            loss.backward()
            if anchors is not None:
                grads = [p.grad for p in params]
                torch._foreach_add_(grads, [p.detach() for p in params], alpha=settings.mu)  # in place:
                torch._foreach_add_(grads, anchors, alpha=-settings.mu)  # no model-sized temporaries
            opt.step()
            total += loss.detach().float()
            steps += 1
    return (total / max(steps, 1)).item()


class RunningMean:
    """sum_k w_k state_k over clients added one at a time; entries that are not floating point are kept
    from the global state (the runner's global state is all float32). AlexNet's BatchNorm statistics
    (running_mean, running_var) are averaged like the weights; a BatchNorm's `num_batches_tracked` is the
    weighted mean of the clients' counts rounded to a whole number (a count; it only matters to a
    BatchNorm with momentum=None, and AlexNet's use 0.1)."""

    def __init__(self, like: dict[str, torch.Tensor]):
        self.sum = {k: torch.zeros_like(v, dtype=torch.float32) if v.is_floating_point() else v.clone()
                    for k, v in like.items()}

    @torch.no_grad()
    def add(self, state: dict[str, torch.Tensor], weight: float) -> None:
        floats = [k for k, v in self.sum.items() if v.is_floating_point()]
        torch._foreach_add_([self.sum[k] for k in floats], [state[k].float() for k in floats], alpha=float(weight))

    def result(self) -> dict[str, torch.Tensor]:
        for k, v in self.sum.items():
            if k.endswith("num_batches_tracked") and v.is_floating_point():
                v.round_()
        return self.sum


@torch.inference_mode()
def accuracy(model, batches, device: torch.device) -> float:
    """Accuracy over (pixels, labels) batches, with one host synchronisation."""
    model.eval()
    with torch.autocast(device.type, enabled=False):  # fp32 even where training is bf16: bf16 flips predictions
        model.prepare_eval()
        hits, n = torch.zeros((), device=device), 0
        for pixels, labels in batches:
            hits += (model.predict(pixels) == labels).sum()
            n += len(labels)
    return (hits / max(n, 1)).item()
