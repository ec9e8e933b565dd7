"""`zeroshot`: frozen CLIP with the class prompts, no training and no rounds: what an adapter adds over CLIP."""
from __future__ import annotations

from ..adapters import Adapter
from . import Method, register


@register("zeroshot")
class ZeroShot(Method):
    communicates = False

    def rounds(self, cfg):
        return 0

    def model(self, adapter):
        return Adapter()  # the identity: CLIP's cosine with the class prompts
