"""A Flower client's personal state (a FedPer head, a Ditto model) across rounds: the client keeps it, the
server never sees it.

It is kept by round: training in round r starts from the state of the last round before r in which this
client trained (or from the method's initial one), and evaluation in round r uses the last one up to r,
so a round that is sent again after a resume starts from where the in-process run would. States live in
the node's context (`context.state`, which Flower keeps for the node between messages) and, when the node
has a folder for them (node config `state-dir`; the simulation of `python -m federate backend=flower`
uses <run folder>/client_states), in safetensors files there too, so that a resumed run finds them. Each
run's states are under the sha256 of its settings.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from safetensors.torch import load_file, save_file

from extract.files import atomic_path

KEEP = 2  # rounds kept per client: the last one trained and the one a resent round replaces
PREFIX = "fedclip-personal"


class PersonalStore:
    def __init__(self, records, folder: str | Path | None, settings: str, client: str):
        run = hashlib.sha256(settings.encode()).hexdigest()[:16]
        self.records, self.prefix = records, f"{PREFIX}/{run}/"
        self.folder = Path(folder) / run / re.sub(r"[^A-Za-z0-9_.-]", "_", client) if folder else None

    def _rounds(self) -> dict[int, object]:
        """round -> where its state is (a record key, or a file)."""
        found = {}
        if self.folder is not None and self.folder.is_dir():
            found.update({int(f.stem.split("-")[1]): f for f in self.folder.glob("round-*.safetensors")})
        found.update({int(k[len(self.prefix):]): k for k in self.records.keys() if k.startswith(self.prefix)})
        return found

    def state(self, before: int, initial: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
        """The state after the last round < `before` (the initial one if none)."""
        found = {r: where for r, where in self._rounds().items() if r < before}
        if not found:
            return {k: v.clone() for k, v in initial.items()}
        where = found[max(found)]
        state = load_file(str(where)) if isinstance(where, Path) else self.records[where].to_torch_state_dict()
        return {k: v.to(device).clone() for k, v in state.items()}

    def keep(self, round_: int, state: dict[str, torch.Tensor]) -> None:
        cpu = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        self.records[f"{self.prefix}{round_}"] = ArrayRecord.from_torch_state_dict(cpu)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.folder / f"round-{round_}.safetensors") as tmp:
                save_file(cpu, str(tmp))
        for r in sorted(self._rounds())[:-KEEP]:
            if f"{self.prefix}{r}" in self.records:
                del self.records[f"{self.prefix}{r}"]
            if self.folder is not None:
                (self.folder / f"round-{r}.safetensors").unlink(missing_ok=True)
