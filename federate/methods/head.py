"""The personalized-FL methods' common part (fedper, fedrep, fedbabu, fedrod, ditto, apfl): the model is the
run's adapter as the body with a linear head over its normalised output, initialised from the class
prompts and trained with cross-entropy (federate/heads.py). By default the head is each client's own
(personal) and the body is shared: a client deploys the shared body with its own head, and the target
domain, a client nobody trained a head for, is evaluated with the shared body and the initial head (what
a new client starts from)."""
from __future__ import annotations

from ..errors import ConfigError
from ..heads import WithHead
from . import Method


class HeadMethod(Method):
    heads: tuple[str, ...] = ("head",)

    def check(self, cfg) -> None:
        super().check(cfg)
        if cfg.loss != "ce":
            raise ConfigError(f"method={self.name} trains a linear head with cross-entropy; use loss=ce (its "
                              "config sets it unless the command line says otherwise)")
        if cfg.text_adapter:
            raise ConfigError(f"method={self.name} puts a linear head on the image embedding, where a text "
                              "adapter has no use; use text_adapter=false")

    def model(self, adapter):
        return WithHead(adapter, self.heads)

    def split(self, state):
        shared = {k: v for k, v in state.items() if not k.startswith(tuple(f"{h}." for h in self.heads))}
        self.initial = {k: v for k, v in state.items() if k not in shared}  # a new client's head
        return shared, self.initial

    def deployed(self, train, shared, personal):
        return [{**shared, **{k: v[i] for k, v in personal.items()}} for i in range(len(train))]

    def target_models(self, shared, personal):
        return [{**shared, **self.initial}]

    def head_keys(self, state) -> list[str]:
        return [k for k in state if k.startswith(tuple(f"{h}." for h in self.heads))]

    def body_keys(self, state) -> list[str]:
        return [k for k in state if k not in self.head_keys(state)]
