"""FedPer (Arivazhagan et al. 2019), as FL-bench's src/client/fedper.py: the body is shared and averaged,
the head is each client's own; body and head train together for `local_epochs` (cross-entropy). Unlike
FL-bench, which uploads the heads too (the server averages them, each client then overwrites its own),
a head never leaves its client here, so `bytes_per_round` counts the body only."""
from __future__ import annotations

from . import register
from .head import HeadMethod


@register("fedper")
class FedPer(HeadMethod):
    pass
