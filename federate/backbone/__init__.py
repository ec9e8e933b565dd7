"""Methods that train the backbone on the images (`method=fedavg_full | fedprox_full | fedclip_full`,
`backbone=clip | alexnet`): the paper's baselines, under the cached methods' protocol (docs/backbone.md).

Only this package imports `transformers` (lazily, for `backbone=clip`); the cached methods never do.

- `fedavg_full`: every participant fine-tunes the whole model from the global state for one local epoch
  (a fresh optimiser each round: `optimizer=adam_l2|adamw|sgd`, `optim.py`); the server averages every
  entry of the state dict (`federate.strategy`).
- `fedprox_full`: the same with (mu / 2) ||w - w_global||^2 in local training (`method.mu`).
- `fedclip_full`: CLIP and FedCLIP's AttAI adapter trained together (paper Fig. 3b).

`backbone=clip`: CLIP's two encoders (`model.name`), symmetric in-batch contrastive loss with CLIP's
logit scale; `backbone=alexnet`: the authors' toolkit's AlexNet with BatchNorm (microsoft/PersonalizedFL),
cross-entropy, plain SGD, trained from scratch.
"""
from __future__ import annotations

BACKBONES = ("clip", "alexnet")


def run_images(cfg, method, output_dir, start: float) -> dict:
    """Run an images-in-the-loop method (the dispatch target of federate.run.run)."""
    from .runner import run_images as run

    return run(cfg, method, output_dir, start)
