"""APFL (Deng et al. 2020, "Adaptive Personalized Federated Learning"), as the paper: each client keeps a
local model v and a mixing weight alpha; its personalised model mixes the parameters, v_bar = alpha v +
(1 - alpha) w, with w the global model. Per batch, w takes a step on its own loss (w is sent and averaged),
v on the loss of v_bar (its gradient is alpha times v_bar's), and, with `method.adaptive`, alpha a plain
SGD step of `method.alpha_lr` on <v - w, grad f(v_bar)> + 0.02 alpha (FedTorch's and FL-bench's update),
clipped to [0, 1]. w and v take the run's Adam. A client deploys v_bar; the target domain is evaluated
with w. Defaults from FL-bench's src/server/apfl.py (alpha 0.5, adaptive); FL-bench mixes the two models'
outputs instead of their parameters and updates alpha in the first local epoch only, PFLlib mixes
parameters once after training: the paper's per-step parameter mixing is what runs here. The model is the
adapter with a linear head."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import ConfigError
from ..heads import WithHead
from ..losses import masked_loss
from . import number, register
from .head import HeadMethod

LOCAL = "local."  # v's keys: LOCAL + the model's key


class MixedModel(WithHead):
    """Evaluates v_bar when the state holds v and alpha (a client's), w alone otherwise (the target's)."""

    def mixed(self, params):
        if "alpha" not in params:
            return params
        a = params["alpha"]
        return {k: a * params[LOCAL + k] + (1 - a) * v for k, v in params.items() if LOCAL + k in params}

    def features(self, params, x, low=None):
        return super().features(self.mixed(params), x, low)

    def head_logits(self, params, f, scale, heads=None):
        return super().head_logits(self.mixed(params), f, scale, heads)

    def training_loss(self, params, x, y, ok, counts, scale, low):
        w = {k: v for k, v in params.items() if not k.startswith(LOCAL) and k != "alpha"}
        own = self.head_logits(w, self.features(w, x, low), scale)
        a = params["alpha"]
        mix = {k: a * params[LOCAL + k] + (1 - a) * v.detach() for k, v in w.items()}
        mixed = self.head_logits(mix, self.features(mix, x, low), scale)
        return masked_loss(own, y, ok, "ce") + masked_loss(mixed, y, ok, "ce") + 0.01 * a * a

    def project(self, params):
        params["alpha"].clamp_(0, 1)


@register("apfl", alpha=0.5, adaptive=True, alpha_lr=0.01)
class APFL(HeadMethod):
    def __init__(self, alpha: float = 0.5, adaptive: bool = True, alpha_lr: float = 0.01):
        if not isinstance(adaptive, bool):
            raise ConfigError(f"method.adaptive must be true or false, not {adaptive!r}")
        super().__init__(dict(alpha=number("alpha", alpha, high=1.0), adaptive=adaptive,
                         alpha_lr=number("alpha_lr", alpha_lr)))

    def model(self, adapter):
        return MixedModel(adapter)

    def split(self, state):
        self.initial = {}
        personal = {LOCAL + k: v.clone() for k, v in state.items()}  # v starts at w (FL-bench's server does so)
        personal["alpha"] = torch.tensor(float(self.settings["alpha"]))
        return state, personal

    def train_settings(self, cfg):
        settings = super().train_settings(cfg)
        return replace(settings, sgd_keys=("alpha",), sgd_lr=self.settings["alpha_lr"])

    def local_update(self, train, shared, personal):
        keys = None if self.settings["adaptive"] else [k for k in [*shared, *personal] if k != "alpha"]
        return train.train(shared, personal, keys=keys)

    def deployed(self, train, shared, personal):  # each client's v_bar, mixed once per evaluation
        return [self.mix(shared, {k: v[i] for k, v in personal.items()}) for i in range(len(train))]

    @staticmethod
    def mix(w, own):
        a = own["alpha"]
        return {k: a * own[LOCAL + k] + (1 - a) * v for k, v in w.items()}

    def target_models(self, shared, personal):
        return [shared]
