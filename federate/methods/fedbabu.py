"""FedBABU (Oh et al. 2022), as FL-bench's src/client/fedbabu.py: the head stays frozen at its
initialisation during federation (every client holds the same one, so nothing about it is sent) and the
body is trained and averaged; before it is evaluated, each client fine-tunes the model it received on its
own training rows for `method.finetune_epochs` and deploys the result (never kept: the next round starts
from the shared body again). `method.finetune`: full (body and head, FL-bench's `finetune()` and the
paper's) or head. FL-bench refuses finetune_epoch = 0 and PFLlib fine-tunes 10 epochs once after the last
round; here every round is evaluated, so the default is 1 epoch per evaluation."""
from __future__ import annotations

from ..errors import ConfigError
from . import number, register
from .head import HeadMethod


@register("fedbabu", finetune_epochs=1, finetune="full")
class FedBABU(HeadMethod):
    def __init__(self, finetune_epochs: int = 1, finetune: str = "full"):
        if finetune not in ("full", "head"):
            raise ConfigError(f"method.finetune must be full or head, not {finetune!r}")
        super().__init__(dict(finetune_epochs=number("finetune_epochs", finetune_epochs, low=1, integer=True),
                         finetune=finetune))

    def private_epochs(self, cfg):  # the fine-tuning of every evaluation trains on the client's rows too
        return int(cfg.local_epochs), self.settings["finetune_epochs"]

    def local_update(self, train, shared, personal):
        return train.train(shared, personal, keys=self.body_keys(shared))  # the head stays as it was

    def deployed(self, train, shared, personal):
        head = {k: v.clone() for k, v in personal.items()}  # fine-tuned copies: the clients' heads stay frozen
        keys = None if self.settings["finetune"] == "full" else list(head)
        body = train.train(shared, head, keys=keys, epochs=self.settings["finetune_epochs"], phase="finetune",
                           each=True).stacked
        body = body if self.settings["finetune"] == "full" else {}
        return [{**shared, **{k: v[i] for k, v in body.items()}, **{k: v[i] for k, v in head.items()}}
                for i in range(len(train))]
