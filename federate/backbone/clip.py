"""CLIP with both encoders trainable (`backbone=clip`), optionally with FedCLIP's AttAI adapter on top
(`method=fedclip_full`, paper Fig. 3b). Loaded through extract/model.py (`load_clip`), so `model.name`
is a hub id or a local save_pretrained folder and `model=tiny_random` builds a tiny one.

- Training loss: `contrastive` (default) is CLIP's symmetric in-batch loss on (image, prompt of its own
  label) pairs with CLIP's own logit scale `logit_scale.exp()` (trainable, clamped at 100 as in CLIP);
  `ce` is cross-entropy over all class prompts. The class prompts are encoded once per step (C x T
  prompts) and row i of the batch takes the prompt of its label: the same gradients as encoding each
  image's prompt separately, for C forward passes instead of B.
- Several prompt templates: the raw text embeddings are averaged over templates, as the cached methods do.
- Prediction: the argmax over classes of the cosine of the (adapted) image embedding and the class prompts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import attai as attai_module

MAX_LOGIT_SCALE = 100.0


def projected(output) -> torch.Tensor:
    """The projected embedding (transformers 5 returns an output object whose pooler_output it is)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipClassifier(nn.Module):
    """`clip.*`: the CLIPModel's own parameters; `adapter.<tower>.*`: AttAI (`adapter.image.0.weight`, ...)."""

    backbone = "clip"

    def __init__(self, clip: nn.Module, tokens: dict[str, torch.Tensor], templates: int, classes: int,
                 loss: str = "contrastive", adapter_state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.clip = clip
        self.tokens = tokens  # not parameters: never sent, never averaged
        self.templates, self.classes, self.loss_kind = templates, classes, loss
        self.adapter = None
        if adapter_state is not None:
            towers = sorted({k.split(".")[0] for k in adapter_state})
            dim = adapter_state["image.0.weight"].shape[0]
            self.adapter = nn.ModuleDict({t: attai_module.attai(dim) for t in towers})
            self.adapter.load_state_dict(adapter_state)
        self._eval_text: torch.Tensor | None = None

    def to_device(self, device: torch.device) -> "ClipClassifier":
        self.to(device)
        self.tokens = {k: v.to(device) for k, v in self.tokens.items()}
        return self

    def class_text(self) -> torch.Tensor:
        """Normalised class prompt embeddings [C, D] (averaged over templates, through the text adapter)."""
        t = projected(self.clip.get_text_features(**self.tokens)).float()
        t = t.view(self.templates, self.classes, -1).mean(0)
        if self.adapter is not None and "text" in self.adapter:
            t = self.adapter["text"](t) * t
        return F.normalize(t, dim=-1)

    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        x = projected(self.clip.get_image_features(pixel_values=pixels)).float()
        if self.adapter is not None:
            x = self.adapter["image"](x) * x
        return F.normalize(x, dim=-1)

    def scale(self) -> torch.Tensor:
        return self.clip.logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)

    def loss(self, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        image, text = self.image(pixels), self.class_text()
        scale = self.scale()
        if self.loss_kind == "ce":
            return F.cross_entropy(scale * image @ text.T, labels)
        logits = scale * image @ text[labels].T  # [B, B]: image i against the prompt of image j's label
        target = torch.arange(len(labels), device=labels.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def prepare_eval(self) -> None:
        """Encode the class prompts once for an evaluation (call under inference_mode, in eval mode)."""
        self._eval_text = self.class_text()

    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        return (self.image(pixels) @ self._eval_text.T).argmax(1)
