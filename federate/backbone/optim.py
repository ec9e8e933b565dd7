"""The local optimiser of the methods that train the backbone (Hydra group `optimizer`, conf/optimizer/).

Every participant gets a fresh optimiser every round (the reference protocol), over all trainable
parameters, with the top-level `lr`:
- `adam_l2` (default for backbone=clip): `Adam(lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)`, the
  L2 decay coupled to the gradient and applied to every parameter (LayerNorm gains, biases and
  `logit_scale` included). This is the adapter optimiser of FedCLIP's code, which the paper most likely
  reused for its full-CLIP baselines; kept as the default for fidelity.
- `adamw`: `AdamW(lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)`, decoupled decay on the weight
  matrices and embeddings only, none on gains, biases and `logit_scale` (tensors of fewer than 2
  dimensions): CLIP fine-tuning's usual recipe.
- `sgd`: `SGD(lr, momentum=0, weight_decay=0)` (default for backbone=alexnet): the authors' federated
  toolkit (microsoft/PersonalizedFL, `alg/fedavg.py`: `optim.SGD(params, lr=args.lr)`).

The cached methods train their adapter with FedCLIP's Adam whatever this says; `experiment.check_settings`
refuses another optimiser for them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine import TrainSettings
from ..errors import ConfigError

OPTIMIZERS = ("adam_l2", "adamw", "sgd")
SETTINGS = {  # what each optimiser takes from its config node, besides `name`
    "adam_l2": ("weight_decay", "betas", "eps"),
    "adamw": ("weight_decay", "betas", "eps"),
    "sgd": ("weight_decay", "momentum"),
}


@dataclass(frozen=True)
class BackboneSettings(TrainSettings):
    """TrainSettings plus the optimiser's name and SGD's momentum."""
    optimizer: str = "adam_l2"
    momentum: float = 0.0

    def describe(self) -> dict:
        """summary.json's `optimizer`: the name, the lr and the optimiser's own settings."""
        out = {"name": self.optimizer, "lr": self.lr}
        for key in SETTINGS[self.optimizer]:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


def backbone_settings(cfg, base: TrainSettings) -> BackboneSettings:
    """The run's settings (`base`: lr, batch size, loss, mu, precision) with the `optimizer` group's."""
    node = cfg.get("optimizer") or {"name": "adam_l2"}
    name = node.get("name")
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")
    unknown = set(node) - {"name", *SETTINGS[name]}
    if unknown:
        raise ConfigError(f"optimizer={name} has no setting {', '.join(sorted(unknown))}; "
                          f"it takes {', '.join(SETTINGS[name])}")
    values = {key: numbers(node, key) for key in SETTINGS[name] if key in node}
    decay, betas = values.get("weight_decay", 0.0), values.get("betas", base.betas)
    eps, momentum = values.get("eps", base.eps), values.get("momentum", 0.0)
    problems = [
        (decay < 0, f"optimizer.weight_decay must be >= 0, not {decay}"),
        (len(betas) != 2 or not all(0 <= b < 1 for b in betas),
         f"optimizer.betas must be two numbers in [0, 1), not {list(betas)}"),
        (eps <= 0, f"optimizer.eps must be > 0, not {eps}"),
        (not 0 <= momentum < 1, f"optimizer.momentum must be in [0, 1), not {momentum}"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(message)
    fields = {k: getattr(base, k) for k in TrainSettings.__dataclass_fields__}
    if name == "sgd":  # TrainSettings' default decay is Adam's 0.2; SGD has none unless configured
        fields["weight_decay"] = 0.0
    return BackboneSettings(**{**fields, **values, "optimizer": name})


def numbers(node, key: str):
    """optimizer.<key> as a finite float (betas: a tuple of them), or a one-line ConfigError."""
    value = node[key]
    try:
        out = tuple(float(v) for v in value) if key == "betas" else float(value)
    except (TypeError, ValueError):
        out = None
    if out is None or not all(math.isfinite(v) for v in (out if key == "betas" else (out,))):
        raise ConfigError(f"optimizer.{key} must be {'a list of two numbers' if key == 'betas' else 'a number'}, "
                          f"not {value!r}")
    return out


def param_groups(named, settings: TrainSettings) -> list[dict]:
    """adamw: decay on tensors of 2 or more dimensions only; the others: one group, decay on everything."""
    if getattr(settings, "optimizer", "adam_l2") != "adamw":
        return [{"params": [p for _, p in named], "weight_decay": settings.weight_decay}]
    return [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": settings.weight_decay},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]


def make_optimizer(named, settings: TrainSettings) -> torch.optim.Optimizer:
    """A new optimiser over `named` (name, parameter) pairs; a TrainSettings without `optimizer` is adam_l2."""
    name = getattr(settings, "optimizer", "adam_l2")
    groups = param_groups(named, settings)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return kind(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps, fused=True)


def fresh_optimizer(model, named, settings: TrainSettings) -> torch.optim.Optimizer:
    """A fresh optimiser for this round (reference protocol). For Adam(W) the model's optimiser object is
    kept and its state zeroed (step 0, zero moments): exactly a new one's first steps, without
    allocating two copies of the model's size again for every client (which dominates a round of AlexNet
    or CLIP on a CPU). SGD's momentum buffers are dropped (a new SGD starts without them)."""
    name = getattr(settings, "optimizer", "adam_l2")
    groups = param_groups(named, settings)
    opt = getattr(model, "_fresh_optimizer", None)
    same = (opt is not None and opt.kind == name and len(opt.param_groups) == len(groups)
            and all(len(a["params"]) == len(b["params"]) and all(p is q for p, q in zip(a["params"], b["params"]))
                    for a, b in zip(opt.param_groups, groups)))
    if not same:
        opt = make_optimizer(named, settings)
        opt.kind = name
        model._fresh_optimizer = opt
        return opt
    for group, fresh in zip(opt.param_groups, groups):
        group.update(lr=settings.lr, weight_decay=fresh["weight_decay"])
        if name == "sgd":
            group.update(momentum=settings.momentum)
        else:
            group.update(betas=settings.betas, eps=settings.eps)
    if name == "sgd":
        opt.state.clear()
        return opt
    with torch.no_grad():
        for state in opt.state.values():
            for v in state.values():
                v.zero_()
    return opt
