"""AttAI (FedCLIP's adapter): g = Softmax(Linear(Tanh(Linear(x)))), adapted feature g(x) * x.

Besides its forward for the generic engine, AttAI has hand-written batched kernels (`forward` /
`backward` on stacked [k, ...] weights) that the fast engines use (engine=batched/sequential), in fp32
or with bf16 matrix multiplies (precision=bf16).
"""
from __future__ import annotations

import torch
from torch import nn

from . import Adapter, register

LAYER_KEYS = ("0.weight", "0.bias", "2.weight", "2.bias")


def attai(dim: int) -> nn.Sequential:
    """Linear(d, d) -> Tanh -> Linear(d, d) -> Softmax: 2 d^2 + 2 d parameters (525,312 at d = 512)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim), nn.Softmax(dim=-1))


@register("attai")
class AttAI(Adapter):
    """The image adapter of FedCLIP; `text_adapter=true` adds a second one on the class prompts
    (paper section 4.4). Parameters in nn.Sequential layout: `image.0.weight`, ..., `text.2.bias`."""
    fast_path = True

    def __init__(self, text_tower: bool = False):
        self.towers = ("image", "text") if text_tower else ("image",)
        self.settings = {"text_tower": text_tower}

    def init(self, dim, text):
        state = {}
        for tower in self.towers:  # PyTorch's default Linear init, image tower first
            state.update({f"{tower}.{k}": v for k, v in attai(dim).state_dict().items()})
        return state

    def image(self, params, x):
        return gate(layers(params, "image"), x) * x

    def text(self, params, t):
        return gate(layers(params, "text"), t) * t if "text" in self.towers else t


def gate(weights, x: torch.Tensor) -> torch.Tensor:
    """g(x) of one client's (unstacked) weights on x [n, d]."""
    W1, b1, W2, b2 = weights
    return torch.softmax(torch.tanh(x @ W1.T + b1) @ W2.T + b2, dim=-1)


def layers(state: dict[str, torch.Tensor], tower: str, k: int | None = None):
    """(W1, b1, W2, b2) of one tower; with k, the first k clients of a stacked [K, ...] state."""
    ts = [state[f"{tower}.{key}"] for key in LAYER_KEYS]
    return ts if k is None else [t[:k] for t in ts]


def forward(W1, b1, W2, b2, x: torch.Tensor, low: torch.dtype | None = None, x_low: torch.Tensor | None = None):
    """Batched adapter on x [k, n, d] with per-client weights [k, d, d]: normalised g(x) * x, plus what
    `backward` needs.

    low=torch.bfloat16 runs the matrix multiplies in bf16 (fp32 accumulation) on bf16 copies of the
    weights and of the activations that feed them; biases, tanh, softmax, the gating and the norm stay
    in fp32 (the weights themselves stay fp32). `x_low` is x already cast (the engines cast a round's
    batches once)."""
    if low is None or low == x.dtype:
        # x @ W^T with a row-major W is MKL's slow transposed case on a CPU (1.45x a plain product for
        # [32, 512] x [512, 512]) and W @ x^T is not: each layer computes its output transposed, bias
        # included, and the op after it (tanh, softmax) writes the result back in rows
        h = torch.baddbmm(b1.unsqueeze(2), W1, x.transpose(1, 2)).transpose(1, 2).tanh_().contiguous()
        a = torch.softmax(torch.baddbmm(b2.unsqueeze(2), W2, h.transpose(1, 2)).transpose(1, 2), dim=-1)
        xl, hl, W2l = x, h, W2
    else:
        xl = x.to(low) if x_low is None else x_low
        W2l = W2.to(low)
        h = torch.add(torch.bmm(xl, W1.to(low).transpose(1, 2)), b1.unsqueeze(1)).tanh_()  # bf16 + fp32 -> fp32
        hl = h.to(low)
        a = torch.softmax(torch.add(torch.bmm(hl, W2l.transpose(1, 2)), b2.unsqueeze(1)), dim=-1)
    f = a * x
    norm = f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    fn = f / norm
    return fn, (x, h, a, fn, norm, xl, hl, W2l)


def backward(W2, saved, dfn: torch.Tensor, grads) -> None:
    """Gradients of the weights given d loss / d fn, written into `grads` = (dW1, db1, dW2, db2) (fp32),
    in the precision `forward` ran in (W2 is the fp32 weight; a bf16 forward saved its bf16 copy)."""
    backward_rows(saved, *row_gradients(W2, saved, dfn), grads)


def backward_rows(saved, dz1: torch.Tensor, dz2: torch.Tensor, grads) -> None:
    """The weight gradients (dW1, db1, dW2, db2) from the rows' pre-activation gradients dz1, dz2 [k, B, d]
    (`row_gradients`; DP-SGD scales each row's first), summed over the rows, written into `grads`."""
    x, h, a, fn, norm, xl, hl, W2l = saved
    dW1, db1, dW2, db2 = grads
    torch.sum(dz2, 1, out=db2)
    torch.sum(dz1, 1, out=db1)
    if xl is x:
        torch.bmm(dz2.transpose(1, 2), h, out=dW2)
        torch.bmm(dz1.transpose(1, 2), x, out=dW1)
    else:
        dW2.copy_(torch.bmm(dz2.to(xl.dtype).transpose(1, 2), hl))
        dW1.copy_(torch.bmm(dz1.to(xl.dtype).transpose(1, 2), xl))


def row_gradients(W2, saved, dfn: torch.Tensor):
    """d loss / d z1 and d loss / d z2 (the two layers' pre-activations) on every row, given d loss / d fn:
    what the weight gradients are made of (`backward`, `weight_gradients`)."""
    x, h, a, fn, norm, xl, hl, W2l = saved
    # in place where a temporary is not read again: fewer [k, B, d] tensors to allocate and write
    da = torch.addcmul(dfn, fn, (dfn * fn).sum(-1, keepdim=True), value=-1).div_(norm)  # through f / ||f||
    da.mul_(x)  # through g(x) * x
    dz2 = da.sub_((da * a).sum(-1, keepdim=True)).mul_(a)  # through softmax
    if xl is x:
        return torch.bmm(dz2, W2).mul_(torch.mul(h, h).neg_().add_(1)), dz2  # through Linear 2 and tanh
    return torch.bmm(dz2.to(xl.dtype), W2l) * (1 - h * h), dz2  # bf16 * fp32 -> fp32


def weight_gradient_inputs(saved, dz1: torch.Tensor, dz2: torch.Tensor) -> tuple:
    """The operands of the weight gradients with the rows of all batches flattened: (dz1, x, dz2, h) in the
    matmuls' precision, then dz1 and dz2 in fp32 (for the biases)."""
    x, h, a, fn, norm, xl, hl, W2l = saved
    flat = [t.reshape(-1, t.shape[-1]) for t in (dz1.to(xl.dtype), xl, dz2.to(xl.dtype), hl, dz1, dz2)]
    return tuple(flat)


def weight_gradients(inputs: tuple, rows: slice, grads) -> None:
    """(dW1, db1, dW2, db2) of the rows `rows` of `weight_gradient_inputs` alone, written into `grads` (fp32)."""
    dz1l, xl, dz2l, hl, dz1, dz2 = inputs
    dW1, db1, dW2, db2 = grads
    if dz1l.dtype == dW1.dtype:
        torch.mm(dz1l[rows].T, xl[rows], out=dW1)
        torch.mm(dz2l[rows].T, hl[rows], out=dW2)
    else:
        dW1.copy_(torch.mm(dz1l[rows].T, xl[rows]))
        dW2.copy_(torch.mm(dz2l[rows].T, hl[rows]))
    torch.sum(dz1[rows], 0, out=db1)
    torch.sum(dz2[rows], 0, out=db2)
