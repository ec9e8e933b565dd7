"""CCVR (Luo et al. 2021, "No Fear of Heterogeneity: Classifier Calibration for Federated Learning with
Non-IID Data"), as FL-bench's src/client/ccvr.py and src/server/ccvr.py: FedAvg of the adapter with a
linear head (federate/heads.py; both shared, cross-entropy), then, after the last round, a calibration of
the head on the selected round's model (`Method.after_rounds`): every client sends, per class, its rows,
the mean and the covariance of its features (the head's input) under that model; the server pools them
into one Gaussian per class, draws `method.virtual_per_class` virtual features from each class of two or
more rows, and trains the head alone on them for `method.calibration_epochs` (the body is not touched).
summary.json reports the calibrated model and, under `before_calibration`, the selected round's own numbers.

Deviations from FL-bench, each for a reason:
- pooling: FL-bench's clients send biased covariances (divided by n) into the paper's formula, which
  assumes unbiased ones, and so underestimate the pooled covariance; here clients send unbiased
  covariances and the server pools them exactly (federate/features.py `pool`).
- the calibration's optimiser: FL-bench's is the clients' (SGD at lr 0.01, one pass, batch 32); here too
  the clients' (the run's Adam at the run's lr, `calibration_epochs` passes of the run's batch size).
- FL-bench calibrates at every test round and keeps the uncalibrated model; here the selected round's
  model is calibrated once and both are recorded.

What travels: each round, the adapter and the head (FedAvg); in the calibration, each client receives the
selected model and sends [C] + [C, d] + [C, d, d] float32 (`bytes_after_rounds`).
"""
from __future__ import annotations

import zlib

import torch

from ..features import Moments, class_moments, gaussian_rows, pool, train_linear
from ..heads import WithHead
from ..training import Update
from . import Method, number, refuse_privacy, register
from .head import HeadMethod

CALIBRATION = "calibration"
COUNT, MEAN, COVARIANCE = "ccvr.count", "ccvr.mean", "ccvr.covariance"


class CalibratedModel(WithHead):
    """The adapter with one shared linear head; keeps the cache's logit scale for the calibration."""

    def prepare(self, cache, model_cfg) -> None:
        super().prepare(cache, model_cfg)
        self.scale = float(cache.logit_scale)


@register("ccvr", virtual_per_class=200, calibration_epochs=1)
class CCVR(HeadMethod):
    def __init__(self, virtual_per_class: int = 200, calibration_epochs: int = 1):
        super().__init__(dict(virtual_per_class=number("virtual_per_class", virtual_per_class, low=1, integer=True),
                              calibration_epochs=number("calibration_epochs", calibration_epochs, low=1, integer=True)))

    def check(self, cfg) -> None:
        refuse_privacy(cfg, self, "its clients' per-class means and covariances")
        super().check(cfg)
        # what the server's calibration needs of the run: the clients' optimiser and batch size, the seed
        self.server_settings, self.seed = self.train_settings(cfg), int(cfg.seed)

    def model(self, adapter):
        self.net = CalibratedModel(adapter, ("head",))
        return self.net

    def split(self, state):
        self.initial = {}
        return state, {}  # FedAvg of the body and the head

    def deployed(self, train, shared, personal):
        return Method.deployed(self, train, shared, personal)

    def target_models(self, shared, personal):
        return [shared]

    def after_rounds(self):
        return CALIBRATION

    def update_like(self, shared, round_):
        if round_ != CALIBRATION:
            return shared
        w = shared["head.weight"]
        C, d = w.shape[-2:]
        return {COUNT: w.new_zeros(C), MEAN: w.new_zeros(C, d), COVARIANCE: w.new_zeros(C, d, d)}

    def local_update(self, train, shared, personal):
        if train.round != CALIBRATION:
            return train.train(shared, personal)
        classes = shared["head.weight"].shape[-2]
        zero = {n: 0.0 for n in train.labels}  # (no training, no loss)
        if train.shared_is_common and len(train) > 1:  # one run's clients in one process: pooled at once, as the
            pooled = class_moments(self.net, shared, train.rows, classes)  # server pools what they send
            return Update({COUNT: pooled.count[None], MEAN: pooled.mean[None], COVARIANCE: pooled.covariance()[None]},
                          [sum(train.sizes)], zero)
        sent = []  # each client's, as sent (a Flower client; clients of states of their own)
        for i in range(len(train)):
            m = class_moments(self.net, train.state_of(shared, personal, i), [train.rows[i]], classes)
            sent.append((m.count.float(), m.mean.float(), m.covariance().float()))
        return Update({k: torch.stack([w[j] for w in sent]) for j, k in enumerate((COUNT, MEAN, COVARIANCE))},
                      train.sizes, zero)

    def aggregate(self, server, shared, update):
        if COUNT not in update.stacked:
            return super().aggregate(server, shared, update)
        s = update.stacked
        pooled = pool(Moments.of(s[COUNT], s[MEAN], s[COVARIANCE]))
        weight, bias = self.calibrate(shared["head.weight"], shared["head.bias"], pooled)
        return {**shared, "head.weight": weight, "head.bias": bias}

    def calibrate(self, weight, bias, pooled: Moments):
        """The head trained on virtual features drawn from each class's pooled Gaussian."""
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/ccvr".encode()))
        covariance = pooled.covariance()
        xs, ys = [], []
        n = self.settings["virtual_per_class"]
        for c in torch.nonzero(pooled.count >= 2).flatten().tolist():  # (FL-bench: no covariance below two rows)
            xs.append(gaussian_rows(pooled.mean[c], covariance[c], n, generator).float())
            ys.append(torch.full((n,), c, dtype=torch.long, device=weight.device))
        if not xs:
            return weight, bias
        s = self.server_settings

        def adam(params):  # the clients' optimiser: FedCLIP's Adam with L2 weight decay
            return torch.optim.Adam(params, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)

        return train_linear(weight, bias, torch.cat(xs), torch.cat(ys), epochs=self.settings["calibration_epochs"],
                            batch_size=s.batch_size, optimizer=adam,
                            generator=torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/ccvr/batches".encode())),
                            scale=self.net.scale)
