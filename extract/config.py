"""The typed schema of `python -m extract`'s settings (a Hydra structured config).

conf/extract.yaml names `extract_schema` first in its defaults list, so every value is checked against
these types when the config is composed: `batch_size=abc`, `overwrite=maybe` or `on_bad_image=sometimes`
fail with Hydra's one-line validation error. (Booleans follow OmegaConf: true/false, yes/no, on/off, 1/0.)
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class OnBadImage(str, Enum):
    skip = "skip"
    fail = "fail"


class CacheDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


@dataclass
class GenerateConfig:  # dataset=demo: the generated image set
    images_per_class: int = 48
    size: int = 64
    seed: int = 0


@dataclass
class DatasetConfig:
    name: Optional[str] = None
    hub_id: Optional[str] = None
    hub_split: Optional[str] = None
    image_column: str = "image"  # a hub dataset's columns; domain_column null: one domain named after the dataset
    label_column: str = "label"
    domain_column: Optional[str] = "domain"
    root: Optional[str] = None
    domains: Optional[List[str]] = None
    classes: Optional[List[str]] = None
    prompt_names: Optional[List[str]] = None
    generate: Optional[GenerateConfig] = None
    # A folder dataset: read symbolic links to folders inside root (by default they are recorded as skipped,
    # since a link such as cartoon/dogloop -> ../photo copies one domain's images into another).
    follow_symlinks: bool = False
    # The source images' license (a hub license id) and the dataset's citation (BibTeX), for the card of a
    # shared cache (python -m extract.hub export); null where fedclip does not know them.
    license: Optional[str] = None
    citation: Optional[str] = None


@dataclass
class BuildConfig:  # model=tiny_random: the tiny random CLIP built on first use
    seed: int = 0
    embed_dim: int = 64
    hidden_size: int = 64
    layers: int = 2
    heads: int = 2
    image_size: int = 32
    patch_size: int = 8


@dataclass
class ModelConfig:
    name: str = MISSING
    revision: Optional[str] = None
    build: Optional[BuildConfig] = None


@dataclass
class ExtractConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cache_dir: str = "cache"
    cache_file: Optional[str] = None
    device: Device = Device.auto
    batch_size: int = 32
    num_workers: int = 1
    overwrite: bool = False
    on_bad_image: OnBadImage = OnBadImage.skip
    cache_dtype: CacheDtype = CacheDtype.float32
    prompt_templates: List[str] = field(default_factory=lambda: ["a picture of a {}"])


def template_problem(template: str) -> str | None:
    """What is wrong with a prompt template, if anything: it takes the class name through exactly one `{}`
    (a named or numbered field, a second field or an unpaired brace would fail or drop the name)."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:  # an unpaired { or }
        return f"prompt template {template!r} is malformed ({e}); write literal braces as {{{{ and }}}}"
    if fields != [("", "", None)]:
        written = ", ".join("{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
                            for name, spec, conv in fields)
        found = "no field" if not fields else f"{len(fields)} fields ({written})" if len(fields) > 1 else written
        return (f"prompt template {template!r} has {found} where it needs exactly one {{}} for the class name, "
                "e.g. 'a picture of a {}'")
    return None


def value(x):
    """The plain value of a setting (an Enum member's value)."""
    return x.value if isinstance(x, Enum) else x


ConfigStore.instance().store(name="extract_schema", node=ExtractConfig)
