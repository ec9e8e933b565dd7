"""One experiment's lifecycle, whatever runs its rounds: the runner sets it up (the in-process runner,
federate/run.py; the Flower server, federate/flower/server_app.py; the image backbones,
federate/backbone/runner.py), `execute` runs `Federation.run` with the runner's backend, and `conclude`
writes the outputs: summary.json (the selected round's numbers, the cost, what the run computed on, the
config), the selected round's model file and, with `finetune_epochs`, the numbers after local fine-tuning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError
from .experiment import finish, mean, summarize

log = logging.getLogger("federate")


class RoundsStopped(ConfigError):
    """A backend stops the rounds early (Flower: fewer clients left than flower.min_clients); the rounds
    recorded so far are concluded and summary.json says why it stopped."""


@dataclass
class Experiment:
    """What `conclude` needs of a set-up run."""
    cfg: Any
    method: Any
    federation: Any  # federate.federation.Federation
    output_dir: Path
    dataset: str
    model_name: str
    model: Any  # the clients' model (an Adapter), or None (the image backbones)
    server: Any  # the strategy
    cost: dict
    identity: dict
    target_size: int | None
    save: Callable[[dict], None]  # writes the selected round's states (`Federation.best`)
    extras: Callable[[], dict] = field(default=dict)  # the runner's own summary fields, after the rounds
    finetune: Callable[[dict], dict] | None = None  # client -> test accuracy after fine-tuning the selected models


def execute(experiment: Experiment, backend, start: float) -> dict:
    """The rounds (`Federation.run` with `backend`), then `conclude`."""
    stopped = None
    try:
        experiment.federation.run(backend)
    except RoundsStopped as e:
        if experiment.federation.best["row"] is None:
            raise
        stopped = str(e)
        log.error("%s", e)
    return conclude(experiment, start, stopped)


def conclude(experiment: Experiment, start: float, stopped: str | None = None) -> dict:
    """summary.json, the selected round's model file, optional fine-tuning; the checkpoint goes."""
    e, fed = experiment, experiment.federation
    summary = summarize(e.cfg, e.method, e.dataset, e.model_name, fed, e.cost, e.target_size, e.model, e.server,
                        e.identity)
    summary.update(e.extras())
    if stopped:
        summary["stopped"] = stopped
    if e.finetune is not None and int(e.cfg.finetune_epochs) and fed.rounds:  # (paper Fig. 3c)
        summary["personalization_finetuned"] = e.finetune(fed.best)
        summary["personalization_finetuned_mean"] = mean(summary["personalization_finetuned"].values())
        if getattr(fed, "privacy", None) is not None:  # fine-tuning on the clients' rows spends privacy too
            fed.privacy.finetuned()
            summary.update(fed.privacy_fields())
    e.save(fed.best)
    summary = finish(e.output_dir, summary, e.cfg, start)
    fed.finished()
    return summary
