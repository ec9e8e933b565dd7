"""The lock-step trainer of prompt context (adapter=coop), which `engine=auto` picks for it.

Same protocol as the other engines (federate/engine.py): each client's batch order comes from its
generator (`make_schedule`), clients are ordered largest first so the ones still training at a step are a
prefix [:k] of the stacked state, the optimiser starts fresh every round, and FedProx adds mu (w - w_global)
to the gradient. At every step all k clients' prompts go through the text encoder as one batch (one
context per client: the shared prefix runs once per client, the class tokens once per client and class),
the loss is vmapped over the clients, and one backward pass gives every client's own gradient (a client's
loss depends on its own context only).

Optimisers: `adapter.optimizer=adam` is the project's Adam (TrainSettings: betas, eps, weight decay);
`sgd` is CoOp's SGD: momentum (`adapter.momentum`) and weight decay (`adapter.sgd_weight_decay`) at a
constant `lr` (docs/prompt.md says why there is no cosine schedule).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.optim.adam import adam

from .engine import ClientSets, LockstepTrainer, TrainSettings, autocast, is_stacked, make_schedule
from .losses import masked_loss


class PromptTrainer(LockstepTrainer):
    def __init__(self, adapter, clients: ClientSets, text, scale, settings: TrainSettings):
        super().__init__(adapter, clients, text, scale, settings)
        kind = settings.loss
        self._loss = torch.func.vmap(lambda logits, y, ok: masked_loss(logits, y, ok, kind))

    def train(self, state, epochs, generators, anchor=None, keys=None):
        if keys is not None and "ctx" not in keys:  # the context is all it trains
            return torch.zeros(len(self.clients), device=self.clients.device)
        s, c = self.settings, self.clients
        device = c.x.device
        idx, valid, active, steps = make_schedule(c.sizes, s.batch_size, epochs, generators)
        idx = c.global_rows(idx)
        valid = valid.to(device)
        # the round's batches, [S, K, B, d] and [S, K, B]; CLIP compares normalised image embeddings
        xs, ys = F.normalize(c.x[idx], dim=-1), c.y[idx]
        ctx = state["ctx"]  # [K, n, w], or [K, C, n, w] with class-specific context
        buffers = [torch.zeros_like(ctx) for _ in range(2 if self.adapter.optimizer == "adam" else 1)]
        step_count = torch.zeros((), dtype=torch.float32, device=device)
        stacked_anchor = is_stacked(anchor, state)
        loss_sum = torch.zeros(len(c), device=device)
        for step, k in enumerate(active):
            params = ctx[:k]
            with torch.enable_grad():
                leaf = params.detach().requires_grad_(True)
                with autocast(s.precision, device):
                    features = self.adapter.class_features(leaf)  # [k, C, d], normalised, fp32
                logits = self.scale * torch.bmm(xs[step, :k], features.transpose(1, 2))
                loss = self._loss(logits, ys[step, :k], valid[step, :k])
                grad, = torch.autograd.grad(loss.sum(), leaf)
            # the context's gradient is a strided view into the prompt's, and fused Adam (PyTorch 2.13, CPU)
            # reads its storage as if it were contiguous
            grad = grad.contiguous()
            with torch.no_grad():
                if s.mu:  # FedProx: gradient of (mu / 2) ||w - w_global||^2
                    grad.add_(params - (anchor["ctx"][:k] if stacked_anchor else anchor["ctx"]), alpha=s.mu)
                self._update(params, grad, [b[:k] for b in buffers], step_count)
                loss_sum[:k] += loss.detach()
        return loss_sum / torch.tensor(steps, device=device).clamp_min(1)

    def _update(self, params, grad, buffers, step_count) -> None:
        """One optimiser step of the first k clients' contexts, in place."""
        s = self.settings
        if self.adapter.optimizer == "adam":
            adam([params], [grad], [buffers[0]], [buffers[1]], [], [step_count], fused=params.device.type in ("cpu", "cuda"),
                 amsgrad=False, beta1=s.betas[0], beta2=s.betas[1], lr=s.lr, weight_decay=s.weight_decay, eps=s.eps,
                 maximize=False)
            return
        # torch.optim.SGD's update (dampening 0, not Nesterov); the buffer starts at zero every round,
        # so the first step's momentum * 0 + g equals SGD's first-step copy of g
        g = grad.add(params, alpha=self.adapter.sgd_weight_decay)
        buffers[0].mul_(self.adapter.momentum).add_(g)
        params.add_(buffers[0], alpha=-s.lr)
