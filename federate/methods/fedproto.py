"""FedProto (Tan et al. 2022, "FedProto: Federated Prototype Learning across Heterogeneous Clients"), as
FL-bench's src/client/fedproto.py: no weights are shared. Each client keeps its whole model (the adapter
with a linear head, federate/heads.py) and trains it with cross-entropy plus `method.lambda` times the mean
squared error between each row's feature (the head's input: the normalised adapted embedding) and the
global prototype of its class (rows of a class without one add nothing, as FL-bench's target f.detach();
the mean is over every row and dimension). After training, a client's prototypes are its mean features per
class under its trained model; it sends them with its rows per class, and the server averages them per
class, weighted by rows (`method.weighting=rows`, the issue's and the paper's weights) or uniformly over the
clients that hold the class (`uniform`, FL-bench's, PFLlib's and the official code's mean); a class no
sampled client holds has no prototype that round (FL-bench resets them every round). A client predicts
with its own head (FL-bench; PFLlib predicts the nearest global prototype). The target domain, which no
client's model is for, is evaluated with every client's model (the mean accuracy, as `local`); under
Flower those models stay on their clients, so a run there has no target domain (target_domain=none).

What travels (`bytes_per_round`): the prototypes and counts, [C, d] + [C] float32, up and down.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..features import class_means
from ..heads import WithHead
from ..losses import masked_loss
from ..training import Update
from . import number, register
from .head import HeadMethod

MEAN, COUNT = "proto.mean", "proto.count"  # the global prototypes [C, d] and the rows behind them [C] (0: none)
WEIGHTINGS = ("rows", "uniform")


class ProtoModel(WithHead):
    """The adapter with one linear head, trained with cross-entropy plus the pull of each row's feature
    towards its class's prototype (held in the state as MEAN and COUNT, never trained). AttAI's fast path
    adds the pull's gradient by hand (`feature_grad`); other adapters train through `training_loss`."""

    def __init__(self, body, lam: float):
        super().__init__(body, ("head",))
        self.lam = float(lam)
        self.fast_path = body.fast_path

    def pull(self, params, f: torch.Tensor, y: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """lambda * mean over rows and dimensions of (f - P_y)^2, rows of classes without a prototype 0
        (one client: f [B, d], y and ok [B])."""
        target = params[MEAN][y]
        has = ok & (params[COUNT][y] > 0)
        squared = torch.where(has[:, None], (f - target) ** 2, 0.0)
        return self.lam * squared.sum() / (ok.sum() * f.shape[1])

    def training_loss(self, params, x, y, ok, counts, scale, low):
        f = self.features(params, x, low)
        return masked_loss(self.head_logits(params, f, scale), y, ok, "ce") + self.pull(params, f, y, ok)

    def feature_grad(self, params, f: torch.Tensor, y: torch.Tensor, ok: torch.Tensor | None):
        """The pull on k clients' batches at once (f [k, B, d], y [k, B], ok [k, B] or None): its value [k]
        and its gradient with respect to f [k, B, d]."""
        k, B, d = f.shape
        target = params[MEAN].gather(1, y[:, :, None].expand(k, B, d))
        has = params[COUNT].gather(1, y) > 0
        rows = torch.full((k,), float(B), device=f.device) if ok is None else ok.sum(1).to(f.dtype)
        if ok is not None:
            has = has & ok
        diff = torch.where(has[:, :, None], f - target, 0.0)
        norm = self.lam / (rows * d)
        return (diff * diff).sum((1, 2)) * norm, diff * (2 * norm)[:, None, None]


@register("fedproto", weighting="rows", **{"lambda": 1.0})
class FedProto(HeadMethod):
    def __init__(self, weighting: str = "rows", **settings):
        lam = settings.pop("lambda", 1.0)
        if settings:
            raise TypeError(f"unexpected keyword argument {next(iter(settings))!r}")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"method.weighting must be rows or uniform, not {weighting!r}")
        super().__init__({"lambda": number("lambda", lam), "weighting": weighting})

    def model(self, adapter):
        self.net = ProtoModel(adapter, self.settings["lambda"])
        return self.net

    def split(self, state):
        C, d = state["head.weight"].shape
        w = state["head.weight"]
        self.initial = {}
        return {MEAN: w.new_zeros(C, d), COUNT: w.new_zeros(C)}, state  # no prototype yet; each client its model

    def local_update(self, train, shared, personal):
        trained = train.train(shared, personal, keys=list(personal), send=False)  # the prototypes stay frozen
        states = [train.state_of({}, personal, i) for i in range(len(train))]
        counts, means = class_means(self.net, states, train.rows, personal["head.weight"].shape[1])
        return Update({MEAN: means, COUNT: counts}, trained.num_examples, trained.losses)

    def aggregate(self, server, shared, update):
        counts, means = update.stacked[COUNT], update.stacked[MEAN]
        weights = counts if self.settings["weighting"] == "rows" else (counts > 0).to(counts.dtype)
        total = weights.sum(0)
        mean = (weights[:, :, None] * means).sum(0) / total.clamp_min(1)[:, None]
        return {MEAN: torch.where((total > 0)[:, None], mean, 0.0), COUNT: counts.sum(0)}

    def deployed(self, train, shared, personal):
        return [{k: v[i] for k, v in personal.items()} for i in range(len(train))]

    def target_models(self, shared, personal):
        n = len(next(iter(personal.values()))) if personal else 0  # (none where the clients keep them: Flower)
        return [{k: v[i] for k, v in personal.items()} for i in range(n)]
