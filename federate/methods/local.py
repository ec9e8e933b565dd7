"""`local`: each client trains its own model on its own rows and never communicates (the lower bound of
federation). The target domain is evaluated with every client's model; the recorded accuracy is their mean."""
from __future__ import annotations

from . import Method, register


@register("local")
class Local(Method):
    communicates = False

    def split(self, state):
        return {}, state

    def aggregate(self, server, shared, update):
        return shared

    def deployed(self, train, shared, personal):
        return [{k: v[i] for k, v in personal.items()} for i in range(len(train))]

    def target_models(self, shared, personal):
        n = len(next(iter(personal.values())))
        return [{k: v[i] for k, v in personal.items()} for i in range(n)]
