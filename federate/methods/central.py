"""`central`: one model trained on the pooled training rows of all participants, the non-federated upper
bound; nothing is communicated and the server strategy is not used."""
from __future__ import annotations

from . import Method, register


@register("central")
class Central(Method):
    communicates = False

    def units(self, clients):
        return [list(range(len(clients)))]

    def aggregate(self, server, shared, update):
        return {k: v[0] for k, v in update.stacked.items()}  # the one unit's model is the model
