"""The type schema of conf/federate.yaml (Hydra's "structured config as a schema for YAML"): the values
live in the YAML, the types here, so `lr=abc`, `seed=abc` or `text_adapter=maybe` are refused by Hydra
with a one-line validation error before anything runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class FlowerSettings:
    min_clients: int = MISSING
    round_timeout: float = MISSING
    startup_timeout: float = MISSING


@dataclass
class FederateConfig:
    dataset: Any = MISSING
    model: Any = MISSING
    optimizer: Any = None  # the backbone methods' (conf/optimizer/)
    method: Any = MISSING
    adapter: Any = MISSING
    strategy: Any = MISSING
    backbone: Any = MISSING
    partition: Any = MISSING
    privacy: Any = MISSING  # conf/privacy/ (federate/privacy.py)
    target_domain: Optional[str] = None
    lr: float = MISSING
    rounds: int = MISSING
    local_epochs: int = MISSING
    batch_size: int = MISSING
    seed: int = MISSING
    cache_dir: str = MISSING
    cache_file: Optional[str] = None
    device: str = MISSING
    aggregation: str = MISSING
    loss: str = MISSING
    text_adapter: bool = MISSING
    finetune_epochs: int = MISSING
    split_file: Optional[str] = None
    clients_per_round: Optional[int] = None
    selection: str = "val_mean"
    engine: str = MISSING
    precision: str = "fp32"
    backend: str = MISSING
    flower: FlowerSettings = field(default_factory=FlowerSettings)


ConfigStore.instance().store(name="federate_schema", node=FederateConfig)
