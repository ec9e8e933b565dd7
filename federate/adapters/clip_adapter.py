"""CLIP-Adapter (Gao et al. 2021): a bottleneck MLP on the image embedding, mixed in residually:
f = ratio * mlp(x) + (1 - ratio) * x, with mlp = Linear(d, d/r, bias=False) -> ReLU -> Linear(d/r, d,
bias=False) -> ReLU. At d = 512 and reduction 4: 131,072 parameters."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from . import Adapter, register


@register("clip_adapter")
class CLIPAdapter(Adapter):
    towers = ("image",)

    def __init__(self, reduction: int = 4, ratio: float = 0.2, text_tower: bool = False):
        super().__init__(text_tower=text_tower, reduction=int(reduction), ratio=float(ratio))
        self.reduction, self.ratio = int(reduction), float(ratio)
        if self.reduction < 1:
            raise ConfigError(f"adapter.reduction must be >= 1 (the hidden width is dim / reduction), not {reduction}")
        if not 0 <= self.ratio <= 1:  # also NaN
            raise ConfigError(f"adapter.ratio must be in [0, 1] (the share of the adapted embedding), not {ratio}")

    def init(self, dim, text):
        if dim // self.reduction < 1:
            raise ConfigError(f"adapter.reduction={self.reduction} leaves no hidden unit for dim {dim}; use at most {dim}")
        mlp = nn.Sequential(nn.Linear(dim, dim // self.reduction, bias=False), nn.ReLU(),
                            nn.Linear(dim // self.reduction, dim, bias=False), nn.ReLU())
        return {f"image.{k}": v for k, v in mlp.state_dict().items()}

    def image(self, params, x):
        hidden = torch.relu(x @ params["image.0.weight"].T)
        return self.ratio * torch.relu(hidden @ params["image.2.weight"].T) + (1 - self.ratio) * x
