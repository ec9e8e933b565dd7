"""CLIP's frozen text encoder for prompt learning (adapter=coop), run on learned context vectors.

The weights are read straight from the model folder's safetensors files (the `text_model.*` tensors and
`text_projection`), so the image tower is never loaded; `transformers` is imported only here, lazily,
for the tokenizer and the config's defaults. The forward is CLIP's text transformer written out (pre-LN
layers, causal self-attention, the final LayerNorm at the EOS token, the projection), which lets it take
context vectors instead of token ids and run two exact short cuts (tests check both against the full
77-token forward of transformers' CLIPModel):

- truncation: attention is causal and the feature is read at the EOS token, so tokens after the last EOS
  of the class set change no output; they are dropped;
- a shared prefix: with one context for all classes, the start token and the context are the same for
  every class, and (causal again) so are their hidden states in every layer. They are computed once per
  context, and each class's remaining tokens (its name, ".", EOS) attend to the prefix's keys and values.

Every forward is batched over clients: context [K, n, w] (or [K, C, n, w] with class-specific context)
gives class features [K, C, d].
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ConfigError

log = logging.getLogger("federate")

ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


@dataclass(frozen=True)
class Layer:
    qkv_w: torch.Tensor  # [3w, w]: q, k and v projections stacked
    qkv_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    ln1: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]
    fc1: tuple[torch.Tensor, torch.Tensor]
    fc2: tuple[torch.Tensor, torch.Tensor]


class TextEncoder:
    """CLIP's text transformer and projection as plain tensors (frozen, no autograd state of their own)."""

    def __init__(self, tensors: dict[str, torch.Tensor], heads: int, eps: float, act: str, eos_token_id: int):
        if act not in ACTIVATIONS:
            raise ConfigError(f"the text encoder's activation {act!r} is not supported by adapter=coop "
                              f"(supported: {', '.join(ACTIVATIONS)})")
        t = tensors
        self.token_embedding = t["text_model.embeddings.token_embedding.weight"]
        self.position_embedding = t["text_model.embeddings.position_embedding.weight"]
        self.layers = []
        i = 0
        while f"text_model.encoder.layers.{i}.layer_norm1.weight" in t:
            p = f"text_model.encoder.layers.{i}."
            qkv = ("q_proj", "k_proj", "v_proj")
            self.layers.append(Layer(
                torch.cat([t[p + f"self_attn.{n}.weight"] for n in qkv]),
                torch.cat([t[p + f"self_attn.{n}.bias"] for n in qkv]),
                t[p + "self_attn.out_proj.weight"], t[p + "self_attn.out_proj.bias"],
                (t[p + "layer_norm1.weight"], t[p + "layer_norm1.bias"]),
                (t[p + "layer_norm2.weight"], t[p + "layer_norm2.bias"]),
                (t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"]), (t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"])))
            i += 1
        self.final_ln = (t["text_model.final_layer_norm.weight"], t["text_model.final_layer_norm.bias"])
        self.projection = t["text_projection.weight"]  # [d, w]
        self.heads, self.eps, self.act_name, self.eos_token_id = heads, eps, act, eos_token_id
        self.act = ACTIVATIONS[act]
        self.width = self.token_embedding.shape[1]
        self.max_length = self.position_embedding.shape[0]
        self._on: dict[torch.device, TextEncoder] = {}

    @property
    def device(self) -> torch.device:
        return self.token_embedding.device

    def to(self, device) -> "TextEncoder":
        """This encoder on `device` (moved once, then kept)."""
        device = torch.device(device)
        if device == self.device:
            return self
        if device not in self._on:
            self._on[device] = TextEncoder({k: v.to(device) for k, v in self.tensors().items()}, self.heads, self.eps,
                                           self.act_name, self.eos_token_id)
        return self._on[device]

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"text_model.embeddings.token_embedding.weight": self.token_embedding,
             "text_model.embeddings.position_embedding.weight": self.position_embedding,
             "text_model.final_layer_norm.weight": self.final_ln[0], "text_model.final_layer_norm.bias": self.final_ln[1],
             "text_projection.weight": self.projection}
        for i, layer in enumerate(self.layers):
            p = f"text_model.encoder.layers.{i}."
            for n, w, b in zip(("q_proj", "k_proj", "v_proj"), layer.qkv_w.chunk(3), layer.qkv_b.chunk(3)):
                t[p + f"self_attn.{n}.weight"], t[p + f"self_attn.{n}.bias"] = w, b
            t[p + "self_attn.out_proj.weight"], t[p + "self_attn.out_proj.bias"] = layer.out_w, layer.out_b
            for n, (w, b) in (("layer_norm1", layer.ln1), ("layer_norm2", layer.ln2), ("mlp.fc1", layer.fc1),
                              ("mlp.fc2", layer.fc2)):
                t[p + n + ".weight"], t[p + n + ".bias"] = w, b
        return t

    # --- the transformer -------------------------------------------------------------------------------

    def _ln(self, x, weights):
        return F.layer_norm(x, (self.width,), weights[0], weights[1], self.eps)

    def _qkv(self, layer: Layer, x):
        """Queries, keys and values [..., heads, L, head_dim] of the pre-LN input x [..., L, w]."""
        q, k, v = F.linear(self._ln(x, layer.ln1), layer.qkv_w, layer.qkv_b).chunk(3, dim=-1)
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(-3, -2)  # noqa: E731
        return split(q), split(k), split(v)

    def _finish(self, layer: Layer, x, attended):
        """The residual attention output and the MLP block of one layer (attended: [..., heads, L, hd])."""
        x = x + F.linear(attended.transpose(-3, -2).flatten(-2), layer.out_w, layer.out_b)
        h = self.act(F.linear(self._ln(x, layer.ln2), *layer.fc1))
        return x + F.linear(h, *layer.fc2)

    def _project(self, x_eos):
        return F.linear(self._ln(x_eos, self.final_ln), self.projection)

    def forward(self, embeds: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """Projected features [..., d] of token embeddings [..., L, w] (positions added here), read at the
        positions `eos` [...]; causal attention over the L tokens."""
        x = embeds + self.position_embedding[:embeds.shape[-2]]
        for layer in self.layers:
            q, k, v = self._qkv(layer, x)
            x = self._finish(layer, x, F.scaled_dot_product_attention(q, k, v, is_causal=True))
        index = eos[..., None, None].expand(*eos.shape, 1, self.width)
        return self._project(x.gather(-2, index).squeeze(-2))

    def forward_shared_prefix(self, prefix: torch.Tensor, suffix: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """Features [K, C, d] of the prompts [prefix_k, suffix_c]: prefix [K, P, w] (start token and one
        context per client), suffix [C, S, w] (each class's tokens, EOS within), eos [C] (position in the
        suffix). The prefix runs once per client; the suffixes attend to its keys and values."""
        K, P, _ = prefix.shape
        C, S, _ = suffix.shape
        xp = prefix + self.position_embedding[:P]
        xs = (suffix + self.position_embedding[P:P + S]).expand(K, C, S, self.width)
        # a suffix token sees the whole prefix and the suffix tokens up to itself
        allowed = torch.cat([torch.ones(S, P, dtype=torch.bool, device=prefix.device),
                             torch.ones(S, S, dtype=torch.bool, device=prefix.device).tril()], dim=1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            qp, kp, vp = self._qkv(layer, xp)  # [K, heads, P, hd]
            qs, ks, vs = self._qkv(layer, xs)  # [K, C, heads, S, hd]
            keys = torch.cat([kp[:, None].expand(K, C, *kp.shape[1:]), ks], dim=-2)
            values = torch.cat([vp[:, None].expand(K, C, *vp.shape[1:]), vs], dim=-2)
            xs = self._finish(layer, xs, F.scaled_dot_product_attention(qs, keys, values, attn_mask=allowed))
            if i < last:  # the prefix's own output only feeds the next layer's keys and values
                xp = self._finish(layer, xp, F.scaled_dot_product_attention(qp, kp, vp, is_causal=True))
        index = eos[None, :, None, None].expand(K, C, 1, self.width)
        return self._project(xs.gather(-2, index).squeeze(-2))


@dataclass(frozen=True)
class Prompts:
    """The token embeddings of CoOp's prompts "<start> <context> <class name>. <end>" for a class set,
    truncated after the last EOS: `start` [w], `suffix` [C, S, w] (name, ".", EOS, then padding) and
    `eos` [C], the EOS position in the suffix. `ids` [C, P + S] are the token ids with the context
    written as "X" tokens (for reference forwards)."""
    start: torch.Tensor
    suffix: torch.Tensor
    eos: torch.Tensor
    ids: torch.Tensor
    n_ctx: int
    _on: dict = field(default_factory=dict, compare=False, repr=False)

    def to(self, device) -> "Prompts":
        """These prompts on `device` (copied once, then kept: training asks at every step)."""
        device = torch.device(device)
        if device == self.start.device:
            return self
        if device not in self._on:
            self._on[device] = Prompts(self.start.to(device), self.suffix.to(device), self.eos.to(device), self.ids,
                                       self.n_ctx)
        return self._on[device]


class PromptModel:
    """A frozen text encoder with its tokenizer: builds the prompts of a class set and encodes contexts."""

    def __init__(self, encoder: TextEncoder, tokenizer, folder: Path):
        self.encoder, self.tokenizer, self.folder = encoder, tokenizer, folder

    def context_tokens(self, text: str) -> list[int]:
        """The token ids of `text` without the start and end tokens."""
        return self.tokenizer(text)["input_ids"][1:-1]

    def prompts(self, names: list[str], n_ctx: int) -> Prompts:
        """CoOp's prompts: n_ctx context placeholders ("X"), the class name and "."; one-line error if one
        does not fit the encoder's 77 tokens."""
        placeholder = self.context_tokens("X")
        if len(placeholder) != 1:
            raise ConfigError(f"the tokenizer of {self.folder} splits 'X' into {len(placeholder)} tokens; "
                              "adapter=coop needs a CLIP tokenizer")
        texts = [" ".join(["X"] * n_ctx + [name]) + "." for name in names]
        encoded = self.tokenizer(texts, padding="max_length", max_length=self.encoder.max_length, truncation=False)
        lengths = [len(i) for i in encoded["input_ids"]]
        if max(lengths) > self.encoder.max_length:
            longest = names[lengths.index(max(lengths))]
            raise ConfigError(f"the prompt of class {longest!r} with n_ctx={n_ctx} context tokens is longer than the "
                              f"text encoder's {self.encoder.max_length} tokens; lower adapter.n_ctx")
        ids = torch.tensor(encoded["input_ids"])
        eos = eos_positions(ids, self.encoder.eos_token_id)
        length = int(eos.max()) + 1  # everything after the last EOS is dropped (exact: causal attention)
        with torch.no_grad():
            embeds = self.encoder.token_embedding[ids[:, :length].to(self.encoder.device)]
        return Prompts(embeds[0, 0].cpu(), embeds[:, 1 + n_ctx:].cpu(), eos - 1 - n_ctx, ids[:, :length], n_ctx)

    def features(self, ctx: torch.Tensor, prompts: Prompts, shared: bool = True) -> torch.Tensor:
        """Class features [K, C, d] (unnormalised) of contexts [K, n, w] (one per client) or [K, C, n, w]
        (class-specific). `shared=False` runs every class's prompt whole (the reference for tests)."""
        encoder = self.encoder.to(ctx.device)
        prompts = prompts.to(ctx.device)
        K, C = ctx.shape[0], len(prompts.eos)
        start = prompts.start.to(ctx.dtype)
        if ctx.dim() == 3 and shared:
            prefix = torch.cat([start.expand(K, 1, -1), ctx], dim=1)
            return encoder.forward_shared_prefix(prefix, prompts.suffix, prompts.eos)
        per_class = ctx if ctx.dim() == 4 else ctx[:, None].expand(K, C, *ctx.shape[1:])
        tokens = torch.cat([start.expand(K, C, 1, -1), per_class, prompts.suffix.expand(K, *prompts.suffix.shape)], dim=2)
        return encoder.forward(tokens, (prompts.eos + 1 + prompts.n_ctx).expand(K, C))


def eos_positions(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Where CLIP reads each prompt's feature, as transformers' CLIPTextTransformer does: the highest token
    id for the original configs (eos_token_id 2), otherwise the first EOS token."""
    if eos_token_id == 2:
        return ids.argmax(-1)
    is_eos = ids == eos_token_id
    if not bool(is_eos.any(-1).all()):
        raise ConfigError(f"a tokenised prompt has no EOS token (id {eos_token_id}); the tokenizer does not match "
                          "the text encoder's config")
    return is_eos.int().argmax(-1)


# --- loading --------------------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def load_prompt_model(folder: str, fingerprint: str) -> PromptModel:
    """The text encoder and tokenizer of a CLIP folder saved with save_pretrained (safetensors only); kept
    per process (every client and sweep point shares one copy of the frozen weights). `fingerprint` is
    the folder's content fingerprint: the key that makes a changed folder load again."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, CLIPConfig

    directory = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    try:
        for f in sorted(directory.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                tensors.update({k: st.get_tensor(k) for k in st.keys() if is_text_tensor(k)})
        config = CLIPConfig.from_pretrained(folder).text_config
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # safetensors, JSON and tokenizer errors are of many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot load the text encoder of {directory} for adapter=coop ({type(e).__name__}: "
                          f"{first}); re-save the model with save_pretrained") from None
    encoder = encoder_from(tensors, config, directory)
    log.info("text encoder for prompt learning: %s (%d layers, width %d, %s parameters)", directory.name,
             len(encoder.layers), encoder.width, f"{sum(t.numel() for t in tensors.values()):,}")
    return PromptModel(encoder, tokenizer, directory)


def is_text_tensor(key: str) -> bool:
    """A tensor of CLIPModel's text tower (the text transformer and its projection)."""
    return key.startswith("text_model.") or key == "text_projection.weight"


def encoder_from(tensors: dict[str, torch.Tensor], text_config, where) -> TextEncoder:
    """The text encoder of a CLIPModel's text tensors (state-dict names) and its CLIPTextConfig."""
    tensors = {k: v.detach().float() for k, v in tensors.items() if is_text_tensor(k)}
    try:
        encoder = TextEncoder(tensors, text_config.num_attention_heads, text_config.layer_norm_eps,
                              text_config.hidden_act, text_config.eos_token_id)
    except KeyError as e:
        raise ConfigError(f"the weights in {where} lack the text encoder tensor {e.args[0]}; adapter=coop needs "
                          "a complete CLIP checkpoint saved with save_pretrained") from None
    if not encoder.layers:
        raise ConfigError(f"the weights in {where} have no text encoder layers; adapter=coop needs a CLIP checkpoint")
    if encoder.width % encoder.heads:
        raise ConfigError(f"the text encoder of {where} has width {encoder.width} and {encoder.heads} heads, which "
                          "do not divide; its config.json does not match its weights")
    return encoder


def model_folder(cache, model_cfg) -> Path:
    """The folder of `model.name`: a local folder, a hub id's snapshot in the local hub cache, or, for a
    model that extract builds (`model=tiny_random`), the folder it built beside the cache's folder."""
    name = str(model_cfg.name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if model_cfg.get("build"):
        built = Path(cache.path).parents[1] / "models" / name.replace("/", "--")  # <cache_dir>/models/
        if not built.is_dir():
            raise ConfigError(f"adapter=coop needs the weights of {name}, which extract builds in <cache_dir>/models/, "
                              f"but {built} does not exist; pass model.name=<the folder of the cache's model>")
        return built
    from extract.errors import ExtractError
    from extract.model import hub_snapshot

    try:
        return hub_snapshot(name, model_cfg.get("revision") or None)
    except ExtractError as e:
        raise ConfigError(f"adapter=coop runs the text encoder of model.name={name}: {e}") from None


def load_for_cache(cache, model_cfg) -> PromptModel:
    """The text encoder of `model.name`, whose weights must be the cache's (`model_fingerprint`)."""
    from extract.identity import short

    from .cache import folder_fingerprint

    folder = model_folder(cache, model_cfg)
    if not cache.model_fingerprint:
        raise ConfigError(f"{cache.path} records no model fingerprint (an older fedclip wrote it), so adapter=coop "
                          "cannot check its text encoder against the cache; rebuild it (python -m extract ... "
                          "overwrite=true)")
    mine = folder_fingerprint(folder)
    if mine != cache.model_fingerprint:
        raise ConfigError(f"{cache.path} was built with other weights ({short(cache.model_fingerprint)}) than those "
                          f"of model.name={model_cfg.name} ({short(mine)}); adapter=coop needs the cache's own model: "
                          "pass model.name=<a copy of the cache's weights>, or extract a cache with these weights")
    return load_prompt_model(str(folder), mine)
