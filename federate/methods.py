"""Methods behind a name registry (`method=<name>`, Hydra group `method`).

A method is a description the runners read instead of branching on names: which training sets it uses,
whether the server aggregates, which adapters are evaluated, and where it can run.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    trains: str  # "clients": each participant trains on its own rows; "pooled": one adapter on all of them; "none"
    aggregates: bool = False  # the server combines the clients' adapters after every round (it communicates)
    personal: bool = False  # each participant keeps and is evaluated with its own adapter (no global one)
    proximal: bool = False  # local training adds (mu / 2) ||w - w_global||^2 (`method.mu`)
    flower: bool = False  # Flower's federation can run it
    images: bool = False  # trains on images with CLIP in the loop instead of on the cache

    def __post_init__(self):
        if self.trains not in ("clients", "pooled", "none"):
            raise ValueError(f"Method.trains must be clients, pooled or none, not {self.trains!r}")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


for _m in (
    Method("fedclip", "clients", aggregates=True, flower=True),
    Method("fedprox", "clients", aggregates=True, proximal=True, flower=True),
    Method("local", "clients", personal=True),
    Method("central", "pooled"),
    Method("zeroshot", "none"),
    Method("fedavg_full", "clients", aggregates=True, images=True),  # federate/backbone/
    Method("fedprox_full", "clients", aggregates=True, proximal=True, images=True),
    Method("fedclip_full", "clients", aggregates=True, images=True),
):
    register(_m)


def get(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, not {name!r}")
    return METHODS[name]
