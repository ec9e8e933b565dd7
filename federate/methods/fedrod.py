"""FedRoD (Chen and Chao 2022): a generic head, trained with the balanced softmax and shared with the body,
plus each client's personal head. As PFLlib's clientrod.py (and the paper): per batch, the body and the
generic head minimise the balanced softmax cross-entropy, CE(g + log n_c), with n_c the client's training
rows of class c (`method.gamma` as FL-bench's exponent, 1); the personal head minimises CE(g + p) on the
body's features with g and the features detached (it trains nothing else); a client predicts with g + p,
and the target domain (no personal head) with g alone. FL-bench's src/client/fedrod.py predicts with the
personal head alone on features that are not detached, and its generic model never reaches the clients
(its parameter names differ between server and clients), so its wiring is not followed. One optimiser
(the run's Adam) steps every key; the hyper-network option (FL-bench's `hyper`, off by default) is not
offered."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..heads import WithHead
from ..losses import masked_loss
from . import number, register
from .head import HeadMethod


class RoDModel(WithHead):
    def training_loss(self, params, x, y, ok, counts, scale, low):
        f = self.features(params, x, low)
        g = self.head_logits(params, f, scale, ("head",))
        balanced = masked_loss(g + torch.log(counts ** self.gamma), y, ok, "ce")  # (0 ** 0 = 1: gamma 0 is CE)
        p = self.head_logits(params, f.detach(), scale, ("phead",))
        return balanced + masked_loss(g.detach() + p, y, ok, "ce")


@register("fedrod", gamma=1.0)
class FedRoD(HeadMethod):
    heads = ("head", "phead")  # generic (shared), personal

    def __init__(self, gamma: float = 1.0):
        super().__init__(dict(gamma=number("gamma", gamma)))

    def check(self, cfg) -> None:
        super().check(cfg)
        if cfg.get("privacy") is not None and cfg.privacy.get("name") == "dpsgd" and self.settings["gamma"]:
            raise ConfigError("method=fedrod's balanced softmax reads the client's label counts, which DP-SGD's "
                              "per-sample clipping does not protect; use method.gamma=0 with privacy=dpsgd")

    def model(self, adapter):
        model = RoDModel(adapter, self.heads)
        model.gamma = self.settings["gamma"]
        return model

    def split(self, state):
        personal = {k: v for k, v in state.items() if k.startswith("phead.")}
        self.initial = personal
        return {k: v for k, v in state.items() if k not in personal}, personal

    def target_models(self, shared, personal):
        return [{**shared, **{k: torch.zeros_like(v) for k, v in self.initial.items()}}]  # g alone
