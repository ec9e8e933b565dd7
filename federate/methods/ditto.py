"""Ditto (Li et al. 2021), as FL-bench's src/client/ditto.py: every client trains the global model w as
FedAvg does (sent and averaged), then its own personal model v for `method.pers_epochs`, pulled towards the
w it received this round by (lambda / 2) ||v - w||^2 (`method.lambda`, FL-bench's `lamda`, 1.0). A client
deploys v; the target domain is evaluated with w. The model is the adapter with a linear head (both w and
v), so the personal model has something of its own to fit."""
from __future__ import annotations

from dataclasses import replace

from . import number, register
from .head import HeadMethod


@register("ditto", pers_epochs=1, **{"lambda": 1.0})
class Ditto(HeadMethod):
    def __init__(self, pers_epochs: int = 1, **settings):
        lam = settings.pop("lambda", 1.0)
        if settings:
            raise TypeError(f"unexpected keyword argument {next(iter(settings))!r}")
        super().__init__(dict(pers_epochs=number("pers_epochs", pers_epochs, integer=True), **{"lambda": number("lambda", lam)}))

    def split(self, state):
        self.initial = {}
        return state, {k: v.clone() for k, v in state.items()}  # w, and each client's v (starting at w)

    def private_epochs(self, cfg):
        return int(cfg.local_epochs) + self.settings["pers_epochs"], 0

    def local_update(self, train, shared, personal):
        update = train.train(shared, {})  # w: FedAvg's local update, sent
        if self.settings["pers_epochs"]:
            pull = replace(train.settings, mu=self.settings["lambda"])
            train.train(shared, personal, epochs=self.settings["pers_epochs"], anchor=shared, settings=pull,
                        phase="personal", send=False)
        return update

    def deployed(self, train, shared, personal):
        return [{k: v[i] for k, v in personal.items()} for i in range(len(train))]

    def target_models(self, shared, personal):
        return [shared]
