"""The personalized-FL methods' model on the cache: the run's adapter is the body and linear classifiers
over its normalised output are the heads, each initialised from the class prompts (weights = the
normalised prompt embeddings, bias 0, as adapter=linear_head), so that before training the model predicts
as the adapter does with CLIP's prompts. logits = scale * (f @ W^T + b), f = normalise(adapter(x)).

The frozen prompts have nothing to personalise: a head gives a client something of its own to keep (FedPer,
FedRep), to freeze (FedBABU) or to split in two (FedRoD's generic and personal heads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapters import Adapter
from .errors import ConfigError


class WithHead(Adapter):
    """`body` (an adapter of the image embedding) with linear heads named `heads` (state keys
    `<head>.weight` [C, d] and `<head>.bias` [C]); the prediction sums the heads in `predict` (all of
    them by default)."""

    def __init__(self, body: Adapter, heads: tuple[str, ...] = ("head",), predict: tuple[str, ...] | None = None):
        if body.towers != ("image",) or type(body).logits is not Adapter.logits:
            raise ConfigError(f"adapter {body.name} cannot be the body of a method with a linear head (it needs an "
                              "adapter of the image embedding only: attai, clip_adapter or one of yours); "
                              "text_adapter=true has no use there either")
        self.body, self.heads, self.predict = body, tuple(heads), tuple(predict or heads)
        self.name, self.settings, self.towers = body.name, body.settings, ("image",)
        # AttAI's hand-written gradients cover one linear head and cross-entropy (federate/engine.py), not a
        # method's own loss (FedRoD's, APFL's), which trains through torch.func
        self.fast_path = body.fast_path and self.heads == ("head",) and not hasattr(self, "training_loss")

    def prepare(self, cache, model_cfg) -> None:
        self.body.prepare(cache, model_cfg)

    def init(self, dim, text):
        state = dict(self.body.init(dim, text))
        for h in self.heads:
            state.update({f"{h}.weight": F.normalize(text.float(), dim=-1), f"{h}.bias": torch.zeros(len(text))})
        return state

    def head_keys(self, head: str = "") -> tuple[str, ...]:
        heads = (head,) if head else self.heads
        return tuple(f"{h}.{p}" for h in heads for p in ("weight", "bias"))

    def body_keys(self, state) -> tuple[str, ...]:
        return tuple(k for k in state if k not in self.head_keys())

    def features(self, params, x: torch.Tensor, low: torch.dtype | None = None) -> torch.Tensor:
        """normalise(body(x)); `low`: the body's matrix multiplies in that dtype (precision=bf16)."""
        if low is None:
            return F.normalize(self.body.image(params, x), dim=-1)
        from .matmul_precision import LowPrecisionMatmuls

        with LowPrecisionMatmuls(low):
            image = self.body.image(params, x)
        return F.normalize(image, dim=-1)

    def head_logits(self, params, f: torch.Tensor, scale: float, heads: tuple[str, ...] | None = None) -> torch.Tensor:
        """The summed logits of `heads` (the predicting ones by default) on features f [n, d]."""
        return sum(scale * (f @ params[f"{h}.weight"].T + params[f"{h}.bias"]) for h in heads or self.predict)

    def image(self, params, x):
        return self.body.image(params, x)

    def logits(self, params, x, text, scale):
        return self.head_logits(params, self.features(params, x), scale)

    def describe(self) -> dict:
        return self.body.describe()
