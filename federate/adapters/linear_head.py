"""A linear classifier over the normalised image embedding, initialised from the zero-shot class prompts
(weights = the normalised prompt embeddings, bias 0), so that before training it predicts exactly as
zero-shot CLIP. Its config selects the cross-entropy loss. C x d + C parameters."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Adapter, register


@register("linear_head")
class LinearHead(Adapter):
    towers = ("image",)

    def init(self, dim, text):
        return {"head.weight": F.normalize(text.float(), dim=-1), "head.bias": torch.zeros(len(text))}

    def logits(self, params, x, text, scale):
        return scale * (F.normalize(x, dim=-1) @ params["head.weight"].T + params["head.bias"])
