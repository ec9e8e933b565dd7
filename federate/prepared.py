"""Results of grouped sweep points, trained before their Hydra jobs run (federate/sweep.py): each job's
`federate.run.run` takes its own (once) instead of training again. A module of its own, so that the runner
and the sweep do not import each other."""
from __future__ import annotations

import os
from typing import Callable

_PREPARED: dict[str, Callable[[], dict]] = {}


def put(output_dir, result: Callable[[], dict]) -> None:
    _PREPARED[os.path.abspath(output_dir)] = result


def take(output_dir) -> Callable[[], dict] | None:
    """The prepared result for this job folder (once), or None."""
    return _PREPARED.pop(os.path.abspath(output_dir), None)
