"""FedProto (Tan et al. 2022, "FedProto: Federated Prototype Learning across Heterogeneous Clients"), as
FL-bench's src/client/fedproto.py: no weights are shared. Each client keeps its whole model (the adapter
with a linear head, federate/heads.py) and trains it with cross-entropy plus `method.lambda` times the mean
squared error between each row's feature (the head's input: the normalised adapted embedding) and the
global prototype of its class (rows of a class without one add nothing, as FL-bench's target f.detach();
the mean is over every row and dimension). A client's prototypes are the mean features of each class over
the batches of its local epochs, as training computed them (FL-bench, PFLlib and the official code); it
sends them with its rows per class, and the server averages them per class, weighted by rows
(`method.weighting=rows`, the issue's and the paper's weights) or uniformly over the clients that hold the
class (`uniform`, FL-bench's, PFLlib's and the official code's mean); a class no sampled client holds has
no prototype that round (FL-bench resets them every round). A client predicts with its own head (FL-bench;
PFLlib predicts the nearest global prototype). The target domain, which no client's model is for, is
evaluated with every client's model (the mean accuracy, as `local`); under Flower those models stay on
their clients, so a run there has no target domain (target_domain=none).

What travels (`bytes_per_round`): the prototypes and counts, [C, d] + [C] float32, up and down.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..heads import WithHead
from ..losses import masked_loss
from ..training import Update
from . import number, refuse_privacy, register
from .head import HeadMethod

MEAN, COUNT = "proto.mean", "proto.count"  # the global prototypes [C, d] and the rows behind them [C] (0: none)
SUM, ROWS = "proto.sum", "proto.rows"  # a round's sums of each class's training features, and their rows
WEIGHTINGS = ("rows", "uniform")


class ProtoModel(WithHead):
    """The adapter with one linear head, trained with cross-entropy plus the pull of each row's feature
    towards its class's prototype (held in the state as MEAN and COUNT, never trained). Training adds each
    batch's features into SUM and ROWS where the state has them (the client's prototypes of the round).
    AttAI's fast path adds the pull's gradient by hand and the features it computed (`feature_grad`); other
    adapters train through `training_loss` and add the features in `observe`."""

    def __init__(self, body, lam: float):
        super().__init__(body, ("head",))
        self.lam = float(lam)
        self.fast_path = body.fast_path

    @staticmethod
    def accumulate(params, f: torch.Tensor, y: torch.Tensor, ok: torch.Tensor | None) -> None:
        """Add k clients' batch features f [k, B, d] (labels y [k, B], valid rows ok) to their SUM and ROWS."""
        if SUM not in params:
            return
        onehot = F.one_hot(y, params[SUM].shape[1]).to(f.dtype)  # [k, B, C]
        if ok is not None:
            onehot = onehot * ok[:, :, None]
        params[SUM] += torch.bmm(onehot.transpose(1, 2), f)
        params[ROWS] += onehot.sum(1)

    def observe(self, params, x: torch.Tensor, y: torch.Tensor, ok: torch.Tensor | None) -> None:
        """The generic engine's step: the batch's features (before the step, as the fast path sees them)."""
        if SUM in params:
            f = torch.func.vmap(self.features)({k: v for k, v in params.items() if k not in (SUM, ROWS)}, x)
            self.accumulate(params, f, y, ok)

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
        self.accumulate(params, f, y, ok)
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

    def check(self, cfg) -> None:
        refuse_privacy(cfg, self, "its clients' per-class mean features")
        super().check(cfg)
        if cfg.engine == "plain":
            raise ConfigError("method=fedproto adds a term to the loss, which engine=plain (cross-entropy alone) "
                              "leaves out; use engine=auto")

    def local_update(self, train, shared, personal):
        """Each client trains its model (the global prototypes frozen) and sums its training features per
        class on the way; it sends their means and its rows per class."""
        lead = shared[MEAN].shape[:-2]  # (stacked per client in a grouped sweep)
        sums = {SUM: shared[MEAN].new_zeros(*lead, *shared[MEAN].shape[-2:]),
                ROWS: shared[COUNT].new_zeros(shared[COUNT].shape)}
        trained = train.train({**shared, **sums}, personal, keys=list(personal), each=True)
        total, rows = trained.stacked[SUM], trained.stacked[ROWS]
        means = total / rows.clamp_min(1)[..., None]
        return Update({MEAN: means, COUNT: rows / train.epochs}, trained.num_examples, trained.losses)

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
