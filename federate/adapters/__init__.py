"""Adapters: the small trainable modules on top of frozen CLIP embeddings (Hydra group `adapter`).

An adapter holds its parameters as a flat dict `{"<tower>.<name>": tensor}` and defines three pure
functions of one client's parameters (the engines stack and `vmap` them over clients):

- `init(dim, text)`: the initial parameters (seeded by the caller); `text` holds the raw class prompt
  embeddings [C, d], for adapters initialised from the prompts;
- `image(params, x)` / `text(params, t)`: adapted image embeddings [n, d'] and class prompt embeddings
  [C, d'] (by default the embeddings themselves: `towers` says which ones an adapter changes);
- `logits(params, x, text, scale)`: class logits [n, C]; by default `scale` times the cosine similarity
  of the adapted image and prompt embeddings, as CLIP predicts.

Two optional hooks serve adapters that need more than the embeddings (adapter=coop runs CLIP's text
encoder): `prepare(cache, model_cfg)`, which every runner calls once after loading the cache and before
`init_params`, and `engine`, the name of an engine (federate/engine.py `ENGINES`) that `engine=auto` uses
instead of the built-in ones. A model never imports its trainer.

The in-batch contrastive loss only needs the class logits: its B x B logits are `logits[:, labels]`.
Register a new adapter with `@register("name", **defaults)`; it is then `adapter=name` on the command
line (README: "Add your own adapter").
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore

from ..errors import ConfigError

ADAPTERS: dict[str, type["Adapter"]] = {}
YAML_DIR = Path(__file__).resolve().parents[2] / "conf" / "adapter"  # the built-ins' configs


class Adapter:
    name = "identity"
    towers: tuple[str, ...] = ()  # the embeddings it adapts: "image", "text"
    fast_path = False  # hand-written gradients exist (engine=batched/sequential)
    engine: str | None = None  # the engine engine=auto trains it with, when not the built-in ones (coop: "prompt")

    def __init__(self, text_tower: bool = False, **settings):
        if text_tower:
            raise ConfigError(f"adapter {self.name} has no text-tower variant; text_adapter=true needs adapter=attai")
        self.settings = settings

    def prepare(self, cache, model_cfg) -> None:
        """Called once after the cache (federate.cache.EmbeddingCache) is loaded, before `init`; `model_cfg`
        is the run's `model` settings (model.name: hub id or local folder). Nothing to do by default."""

    def init(self, dim: int, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def image(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return x

    def text(self, params: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        return t

    def logits(self, params, x: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
        image = F.normalize(self.image(params, x), dim=-1)
        return scale * image @ F.normalize(self.text(params, text), dim=-1).T

    def describe(self) -> dict:
        """What summary.json records: the name and the settings."""
        return {"name": self.name, **self.settings}


def register(name: str, **defaults):
    """Class decorator: make an Adapter subclass available as `adapter=<name>`, with default settings (its
    config node goes to Hydra's ConfigStore, unless conf/adapter/<name>.yaml configures it)."""
    def add(cls: type[Adapter]) -> type[Adapter]:
        cls.name = name
        ADAPTERS[name] = cls
        if not (YAML_DIR / f"{name}.yaml").exists():
            ConfigStore.instance().store(group="adapter", name=name, node={"name": name, **defaults})
        return cls
    return add


def init_params(adapter: Adapter, dim: int, seed: int, text: torch.Tensor) -> dict[str, torch.Tensor]:
    """The adapter's initial parameters, seeded, leaving the caller's global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {k: v.detach().clone().float() for k, v in adapter.init(dim, text.cpu()).items()}


def build(cfg_adapter, text_tower: bool = False) -> Adapter:
    """The adapter named by the `adapter` config group (`name` plus its settings)."""
    settings = {k: v for k, v in dict(cfg_adapter).items() if k != "name"}
    name = cfg_adapter["name"]
    if name not in ADAPTERS:
        raise ConfigError(f"adapter must be one of {', '.join(sorted(ADAPTERS))}, not {name!r}")
    try:
        return ADAPTERS[name](text_tower=text_tower, **settings)
    except TypeError as e:
        raise ConfigError(f"adapter {name}: {e}") from None


def num_parameters(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state.values())


from . import attai, clip_adapter, coop, linear_head  # noqa: E402,F401  (the built-in adapters register themselves)
