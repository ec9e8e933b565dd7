"""`precision=bf16` for the engines that train any adapter through autograd (the generic and plain
engines), in the scope of AttAI's fast path (attai.forward/backward): only the adapter's own matrix
multiplies run in bf16 (their inputs and weights cast to bf16, fp32 accumulation, the product rounded to
bf16 and returned as fp32), backwards included; biases, activations, softmax, gating, normalisation, the
cosine logits against the class prompts and the loss stay fp32.

torch.autocast covers more: it would also run the logits' matmul in bf16, and an elementwise op on a
bf16 product (CLIP-Adapter's ReLU) would stay bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .adapters import Adapter

MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.mm,
           torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.einsum}


class LowPrecisionMatmuls(TorchFunctionMode):
    """Within it, matrix multiplies (and F.linear, whose bias is added in fp32) run in `dtype`."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def cast(self, value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(self.dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(self.cast(v) for v in value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            out = F.linear(self.cast(x), self.cast(weight)).float()
            return out if bias is None else out + bias
        if func in MATMULS:
            return func(*self.cast(args), **kwargs).float()
        return func(*args, **kwargs)


def adapter_logits(adapter: Adapter, params, x: torch.Tensor, text: torch.Tensor, scale: float,
                   low: torch.dtype | None) -> torch.Tensor:
    """`adapter.logits(params, x, text, scale)` with the adapter's matmuls in `low` (None: fp32)."""
    if low is None:
        return adapter.logits(params, x, text, scale)
    if hasattr(adapter, "head_logits"):  # a body with linear heads (federate/heads.py): the body's layers in bf16
        with LowPrecisionMatmuls(low):
            image = adapter.image(params, x)
        return adapter.head_logits(params, F.normalize(image, dim=-1), scale)
    if type(adapter).logits is not Adapter.logits:  # its own logits: every matmul in it is one of its layers
        with LowPrecisionMatmuls(low):
            return adapter.logits(params, x, text, scale)
    with LowPrecisionMatmuls(low):  # the towers' layers in bf16 ...
        image, prompts = adapter.image(params, x), adapter.text(params, text)
    # ... and Adapter.logits' cosine against the prompts in fp32, as the fast path computes it
    return scale * F.normalize(image, dim=-1) @ F.normalize(prompts, dim=-1).T
