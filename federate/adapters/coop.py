"""CoOp (Zhou et al., IJCV 2022): learned prompt context on the text side; PromptFL when federated.

The class prompts are "<start> ctx_1 ... ctx_n <class name>. <end>" through CLIP's frozen text encoder,
where ctx_1..ctx_n are learned vectors of the text width (512 for ViT-B/32): one context shared by all
classes (`csc=false`, CoOp's default) or one per class (`csc=true`). Only the context is trained and
communicated (state key `ctx`: [n_ctx, w], or [C, n_ctx, w]). The image side is the cache's embeddings.

It owns the text side, so it needs more than the embeddings: `prepare(cache, model_cfg)` loads the text
encoder of `model.name` (federate/text_encoder.py; its weights must be the cache's) and tokenises the
cache's class names. Training uses its own lock-step trainer (federate/prompt_trainer.py), which
`engine=auto` picks through `engine`.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import Adapter, register

OPTIMIZERS = ("adam", "sgd")


@register("coop")
class CoOp(Adapter):
    towers = ("text",)
    engine = "prompt"  # federate/prompt_trainer.py

    def __init__(self, n_ctx: int = 16, ctx_init: str | None = None, csc: bool = False, optimizer: str = "adam",
                 momentum: float = 0.9, sgd_weight_decay: float = 5e-4, text_tower: bool = False):
        if text_tower:
            raise ConfigError("adapter coop learns the prompts itself; text_adapter=true needs adapter=attai")
        ctx_init = str(ctx_init).strip() if ctx_init is not None else None
        n_ctx, csc = typed("n_ctx", n_ctx, int), typed("csc", csc, bool)
        momentum, sgd_weight_decay = typed("momentum", momentum, float), typed("sgd_weight_decay", sgd_weight_decay, float)
        problems = [
            (n_ctx < 1, f"adapter.n_ctx must be >= 1, not {n_ctx}"),
            (ctx_init == "", "adapter.ctx_init must be words (e.g. \"a photo of a\") or null, not empty"),
            (optimizer not in OPTIMIZERS, f"adapter.optimizer must be adam or sgd, not {optimizer!r}"),
            (not 0 <= momentum < 1, f"adapter.momentum must be in [0, 1), not {momentum}"),
            (sgd_weight_decay < 0, f"adapter.sgd_weight_decay must be >= 0, not {sgd_weight_decay}"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)
        self.n_ctx, self.ctx_init, self.csc, self.optimizer = n_ctx, ctx_init, csc, optimizer
        self.momentum, self.sgd_weight_decay = momentum, sgd_weight_decay
        self.settings = {"n_ctx": self.n_ctx, "ctx_init": ctx_init, "csc": self.csc, "optimizer": optimizer}
        if optimizer == "sgd":
            self.settings.update(momentum=self.momentum, sgd_weight_decay=self.sgd_weight_decay)
        self.model = None
        self._features: list[tuple] = []  # evaluation: (context, autocast dtype, class features)

    def prepare(self, cache, model_cfg) -> None:
        from ..text_encoder import load_for_cache

        model = load_for_cache(cache, model_cfg)
        if model.encoder.projection.shape[0] != cache.embed_dim:
            raise ConfigError(f"the text encoder projects to {model.encoder.projection.shape[0]} dimensions, the "
                              f"cache's embeddings have {cache.embed_dim}; the cache was not made with this model")
        self.attach(model, prompt_names(cache))

    def attach(self, model, names: list[str]) -> None:
        """Use the text encoder and tokenizer `model` (federate.text_encoder.PromptModel) on these class names."""
        self.model = model
        if self.ctx_init:
            self.init_tokens = model.context_tokens(self.ctx_init)
            self.n_ctx = self.settings["n_ctx"] = len(self.init_tokens)  # the initial words' tokens
        self.prompts = model.prompts(list(names), self.n_ctx)
        self._features.clear()

    def _prepared(self):
        if self.model is None:
            raise ConfigError("adapter coop was not prepared with a cache (Adapter.prepare); the runner must call it "
                              "after loading the cache")
        return self.model

    def init(self, dim, text):
        model = self._prepared()
        classes, width = len(self.prompts.eos), model.encoder.width
        if self.ctx_init:  # the initial words' token embeddings
            ctx = model.encoder.token_embedding[torch.tensor(self.init_tokens, device=model.encoder.device)].cpu()
        else:  # CoOp's random init
            ctx = torch.randn(*((classes,) if self.csc else ()), self.n_ctx, width) * 0.02
        if self.csc and ctx.dim() == 2:
            ctx = ctx.expand(classes, self.n_ctx, width)
        return {"ctx": ctx.clone()}

    def class_features(self, ctx: torch.Tensor) -> torch.Tensor:
        """Normalised class features [K, C, d] of K contexts (stacked: [K, n, w] or [K, C, n, w])."""
        return F.normalize(self._prepared().features(ctx, self.prompts).float(), dim=-1)

    def logits(self, params, x, text, scale):
        ctx = params["ctx"]
        if torch.is_grad_enabled() and ctx.requires_grad:  # trained through these logits (engine=plain)
            features = self.class_features(ctx[None])[0]
        else:
            features = self._evaluated(ctx)
        return scale * F.normalize(x, dim=-1) @ features.to(x.dtype).T

    def _evaluated(self, ctx: torch.Tensor) -> torch.Tensor:
        """Class features of one context, computed once per distinct context: evaluation asks for the same
        adapter on every split (compared by value, so a changed context is never served stale features)."""
        kind = ctx.device.type
        low = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None  # precision=bf16
        for seen, seen_low, features in self._features:
            if seen_low == low and seen.shape == ctx.shape and seen.device == ctx.device and torch.equal(seen, ctx):
                return features
        with torch.no_grad():
            features = self.class_features(ctx[None])[0]
        self._features.insert(0, (ctx.detach().clone(), low, features))
        del self._features[8:]
        return features


def typed(key: str, value, kind: type):
    """A setting of the given type (the adapter group is untyped in the schema): `csc=maybe` or `n_ctx=abc`
    is one line, never a silent bool("maybe") or a traceback."""
    ok = isinstance(value, bool) if kind is bool else (isinstance(value, (int, float) if kind is float else int)
                                                       and not isinstance(value, bool))
    if not ok:
        what = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise ConfigError(f"adapter.{key} must be {what}, not {value!r}")
    return kind(value)


def prompt_names(cache) -> list[str]:
    """The class names as extract wrote them into the prompts (the cache's `prompt_names`, covered by its
    verified identity checksum), or the class names cleaned the same way in a cache without them."""
    import h5py

    from extract.sources import prompt_names_for

    try:
        with h5py.File(cache.path, "r") as f:
            raw = f.attrs.get("prompt_names")
    except OSError as e:
        raise ConfigError(f"cannot read the prompt names of {cache.path}: {e}") from None
    names = json.loads(raw) if raw is not None else None
    if isinstance(names, list) and len(names) == len(cache.class_names):
        return [str(n) for n in names]
    return prompt_names_for(list(cache.class_names), None)
