"""FedRep (Collins et al. 2021), as FL-bench's src/client/fedrep.py: the head is each client's own and the
body is shared; local training first fits the head with the body frozen for `method.head_epochs`, then
the body with the head frozen for `local_epochs` (FL-bench: `local_epoch - train_body_epoch` = 4 head
epochs, then `train_body_epoch` = 1 body epoch; here the body epochs are the run's `local_epochs`, 1 by
default, so the defaults give FL-bench's 4 + 1). Only the body is sent."""
from __future__ import annotations

from . import number, register
from .head import HeadMethod


@register("fedrep", head_epochs=4)
class FedRep(HeadMethod):
    def __init__(self, head_epochs: int = 4):
        super().__init__(dict(head_epochs=number("head_epochs", head_epochs, integer=True)))

    def private_epochs(self, cfg):
        return self.settings["head_epochs"] + int(cfg.local_epochs), 0

    def local_update(self, train, shared, personal):
        head, body = self.head_keys(personal), self.body_keys(shared)
        if self.settings["head_epochs"]:
            train.train(shared, personal, keys=head, epochs=self.settings["head_epochs"], phase="head", send=False)
        return train.train(shared, personal, keys=body)
