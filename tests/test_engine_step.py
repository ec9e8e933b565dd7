"""The fast path's step shortcuts compute what torch computes (federate/engine.py adam_step,
federate/losses.py contrastive_grad without the prompts' gradient)."""
from __future__ import annotations

import pytest
import torch

from federate.engine import TrainSettings, adam_step, first_adam_step
from federate.losses import contrastive_grad


@pytest.mark.parametrize("fused", [True, False])
def test_adam_steps_after_the_first_are_torchs_adam(fused):
    torch.manual_seed(0)
    s = TrainSettings(lr=1e-3, weight_decay=0.2)
    params = [torch.randn(2, 8, 8), torch.randn(2, 8)]
    grads = [[torch.randn_like(p) * 1e-3 for p in params] for _ in range(4)]
    ref = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.Adam(ref, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)
    for g in grads:
        for p, gi in zip(ref, g):
            p.grad = gi.clone()
        opt.step()
    mine, m, v = [p.clone() for p in params], [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
    count = torch.zeros(())
    first_adam_step(mine, [g.clone() for g in grads[0]], m, v, s, keep_moments=True)
    count.fill_(1)
    for g in grads[1:]:
        adam_step(mine, [gi.clone() for gi in g], m, v, count, s, fused)
    assert count.item() == len(grads)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-8)


def test_the_contrastive_gradient_without_the_prompts_gradient_is_the_same():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(2, 6, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(2, 6, 8), dim=-1)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    for ok in (None, valid):
        loss, d_image, d_text = contrastive_grad(image, text, ok, 30.0)
        loss2, d_image2, none = contrastive_grad(image, text, ok, 30.0, text_grad=False)
        assert d_text is not None and none is None
        assert torch.equal(loss, loss2) and torch.equal(d_image, d_image2)
