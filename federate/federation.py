"""The rounds of one federated run (`Federation`), whatever trains the clients.

Each round r: a seeded sample of the clients trains (`clients_per_round`; all by default), starting from
the global adapter (or, for a personal method, from their own); the server strategy combines the sampled
clients' adapters; every client is evaluated (validation and test, and the target domain); the round's
record goes to history.jsonl; the selection rule (`selection=`, federate/selection.py) keeps the best
round so far; a checkpoint (federate/checkpoint.py) lets a killed run resume after its last round.

What trains and evaluates is a backend: the cached tensors in process (federate/run.py, and a grouped
sweep, federate/sweep.py, that trains many points' clients in one computation and then calls each
point's `end_round`), the Flower apps (federate/flower/server_app.py) or the image backbones
(federate/backbone/runner.py). A backend has

    train(federation, round, sampled) -> Update     # local training of the sampled units
    evaluate(client_states, target_states, parts) -> {"val": {client: acc}, "test": {...}, "target": [...]}

and the loop does the rest.
"""
from __future__ import annotations

import logging
import math
import shlex
import signal
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from . import checkpoint, selection
from .errors import ConfigError
from .evaluate import pick
from .experiment import RunLog, check_finite, mean

log = logging.getLogger("federate")
PARTS = ("val", "test", "target")


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during the rounds; the message says how to resume."""


@dataclass(frozen=True)
class ClientInfo:
    name: str
    domain: str
    sizes: dict  # "train" | "val" | "test" -> rows


@dataclass
class Update:
    """The sampled units' adapters after local training ([M, ...] per tensor, in the order of `sampled`;
    or one pre-averaged adapter [1, ...] with num_examples [1]), their training rows and mean losses."""
    stacked: dict[str, torch.Tensor]
    num_examples: list[int]
    losses: dict[str, float] = field(default_factory=dict)


def config_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def sample(seed: int, round_: int, units: int, per_round: int | None) -> list[int]:
    """The units that train in a round: all, or a seeded sample of `per_round` that depends only on the
    seed and the round (and the number of units)."""
    if per_round is None or per_round >= units:
        return list(range(units))
    rng = np.random.default_rng([int(seed), int(round_), zlib.crc32(b"clients_per_round")])
    return sorted(int(i) for i in rng.choice(units, per_round, replace=False))


def check_clients_per_round(value, clients: int) -> int | None:
    if value is None:
        return None
    if not 1 <= int(value) <= clients:
        raise ConfigError(f"clients_per_round must be between 1 and the number of clients ({clients}), not {value}; "
                          "use clients_per_round=null for all")
    return int(value)


def resume_command(output_dir: Path) -> str:
    """The command that resumes this run: the same overrides and its output folder."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.run.dir=")]
    except ValueError:  # not started by Hydra
        return f"run it again with the same settings and output folder {output_dir}"
    args = ["python", "-m", "federate", *overrides, f"hydra.run.dir={Path(output_dir).resolve()}"]
    return " ".join(shlex.quote(a) for a in args)


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM stops the run like Ctrl-C (the checkpoint of the last round is already on disk)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Federation:
    """One run's rounds and records. `clients`: every client, evaluated each round; the training units
    are the clients (or one pooled unit for a method that trains on the pooled rows)."""

    def __init__(self, cfg, method, clients: list[ClientInfo], global_state: dict, server, output_dir: Path, *,
                 target: str | None, progress: bool = True, every_round: bool = True, strategy_state=None):
        self.cfg, self.method, self.clients, self.server = cfg, method, clients, server
        self.output_dir, self.target, self.every_round = Path(output_dir), target, every_round
        self.global_state = global_state
        self.rounds = int(cfg.rounds) if method.trains != "none" else 0
        self.rule = selection.check_rule(cfg.get("selection", "val_mean"))
        if self.rule == "oracle" and target is None:
            raise ConfigError("selection=oracle selects by the target domain's accuracy, and this run has no "
                              "target domain; use selection=val_mean")
        pooled = method.trains == "pooled"
        self.units = ["pooled"] if pooled else [c.name for c in clients]
        self.unit_rows = ([sum(c.sizes["train"] for c in clients)] if pooled else
                          [c.sizes["train"] for c in clients])
        self.per_round = (check_clients_per_round(cfg.get("clients_per_round"), len(clients))
                          if method.trains == "clients" else None)
        self.personal = ({k: v.expand(len(clients), *v.shape).clone() for k, v in global_state.items()}
                         if method.personal else None)
        self.best = {"row": None, "score": -math.inf, "states": []}
        self.dropped: dict[str, str] = {}  # client -> why the server dropped it (Flower)
        self.done = 0  # the last completed round
        self.config = config_dict(cfg)
        resumed = self._resume()
        self.runlog = RunLog(self.output_dir, max(self.rounds, 1), progress, resume_round=resumed)
        if resumed is None and self.rounds:  # round 0: a run stopped during its first round restarts cleanly
            self._save_checkpoint()

    # --- the rounds

    def run(self, backend) -> None:
        """Every remaining round (or, for a method that does not train, the one evaluation)."""
        try:
            with sigterm_as_interrupt():
                if self.rounds == 0:
                    self.end_round(0, [], None, backend)
                for r in range(self.done + 1, self.rounds + 1):
                    sampled = self.sample(r)
                    self.end_round(r, sampled, backend.train(self, r, sampled), backend)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted after round {self.done} of {self.rounds}; resume with: "
                              f"{resume_command(self.output_dir)}") from None
        finally:
            self.runlog.close()

    @property
    def trained_per_round(self) -> int:
        """How many clients train, and communicate, each round (`clients_per_round`; all by default)."""
        return self.per_round or len(self.clients)

    def sample(self, round_: int) -> list[int]:
        """Indices of the units that train in this round (clients the server dropped never do)."""
        alive = [i for i, u in enumerate(self.units) if u not in self.dropped]
        return [alive[i] for i in sample(self.cfg.seed, round_, len(alive), self.per_round)]

    def start_states(self, sampled: list[int]) -> dict[str, torch.Tensor]:
        """The adapters the sampled units start the round from, stacked [M, ...]: the global one, or each
        client's own for a personal method."""
        if self.personal is not None:
            if sampled == list(range(len(self.clients))):  # every client: trained in place, no copy
                return self.personal
            idx = torch.tensor(sampled, device=next(iter(self.personal.values())).device)
            return {k: v.index_select(0, idx) for k, v in self.personal.items()}
        return {k: v.expand(len(sampled), *v.shape).clone() for k, v in self.global_state.items()}

    def end_round(self, r: int, sampled: list[int], update: Update | None, backend) -> None:
        """After round r's local training: the server strategy, evaluation, selection, records, checkpoint."""
        row = {"round": r, "sampled": [self.units[i] for i in sampled],
               "train_loss": dict(update.losses) if update else {}}
        if update is not None and update.num_examples:  # (Flower: every sampled client may have been dropped)
            check_finite(r, row["train_loss"], update.stacked, self.cfg.lr)
            if self.method.aggregates:
                self.global_state = self.server.aggregate_train(self.global_state, update.stacked, update.num_examples)
                check_finite(r, {}, self.global_state, self.cfg.lr)
            elif self.personal is not None:
                if update.stacked is not self.personal:  # (trained in place when every client trains)
                    idx = torch.tensor(sampled, device=next(iter(self.personal.values())).device)
                    for k, v in self.personal.items():
                        v.index_copy_(0, idx, update.stacked[k])
            else:  # one pooled unit: its adapter is the model
                self.global_state = pick(update.stacked, 0)
        self._evaluate(row, backend)
        row.update(getattr(backend, "row_timings", dict)())  # the image backbones: the round's seconds
        self.done = r
        self.runlog.end_round(row, max(self.rounds, 1), self.best["row"])
        if self.rounds:
            self._save_checkpoint()

    def client_states(self) -> tuple[list[dict], list[dict]]:
        """The adapter each client is evaluated with, and those evaluated on the target domain (a personal
        method has no global adapter: the mean of its clients' accuracies on the target)."""
        if self.personal is not None:
            states = [pick(self.personal, i) for i in range(len(self.clients))]
            return states, states
        return [self.global_state] * len(self.clients), [self.global_state]

    def _evaluate(self, row: dict, backend) -> None:
        client_states, target_states = self.client_states()
        wanted = set(PARTS) if self.every_round or self.rule == "last" else \
            {"val", *(["target"] if self.rule == "oracle" else [])}
        if self.target is None:
            wanted.discard("target")
        self._record(row, backend.evaluate(client_states, target_states, wanted))
        score = selection.score(row, self.rule)
        improved = score > self.best["score"]
        missing = {"test", *(["target"] if self.target is not None else [])} - wanted
        if improved and missing:  # a backend that evaluates only when needed: the selected round's numbers
            self._record(row, backend.evaluate(client_states, target_states, missing))
        if improved:
            row["improved"] = True
            self.best = {"row": row, "score": score,
                         "states": [{k: v.detach().clone() for k, v in s.items()} for s in target_states]}

    def _record(self, row: dict, result: dict) -> None:
        """`result`: {"val": {client: acc}, "test": {client: acc}, "target": [acc per target state]}."""
        if "val" in result:
            row["val_acc"] = dict(result["val"])
            row["val_mean"] = mean(row["val_acc"].values())
            row["val_rows"] = selection.val_rows(row["val_acc"], {c.name: c.sizes["val"] for c in self.clients})
        if "test" in result:
            row["test_acc"] = dict(result["test"])
        if "target" in result or self.target is None:
            row["target_acc"] = mean(result["target"]) if self.target is not None else None

    # --- checkpoint and resume

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {f"global/{k}": v for k, v in self.global_state.items()}
        out.update({f"personal/{k}": v for k, v in (self.personal or {}).items()})
        for name, state in self.server.moments().items():
            out.update({f"strategy/{name}/{k}": v for k, v in state.items()})
        if not self._best_is_current():
            for i, s in enumerate(self.best["states"]):
                out.update({f"best/{i}/{k}": v for k, v in s.items()})
        return out

    def _best_is_current(self) -> bool:
        """The selected round is the last one: its adapters are the global one (or the personal ones), saved
        once (a backbone's state weighs hundreds of MB, 300 personal adapters 630 MB)."""
        return self.best["row"] is not None and self.best["row"]["round"] == self.done

    def _save_checkpoint(self) -> None:
        meta = {"config": self.config, "best_row": self.best["row"], "best_score": self.best["score"],
                "best_is_current": self._best_is_current(), "dropped": self.dropped}
        checkpoint.save(self.output_dir, self.done, self._tensors(), meta)

    def _resume(self) -> int | None:
        """Restore the last completed round from the folder's checkpoint, if it has one of this config."""
        if (self.output_dir / "summary.json").exists() or not checkpoint.exists(self.output_dir):
            return None  # RunLog refuses a finished run's folder
        meta, tensors = checkpoint.load(self.output_dir)
        changed = checkpoint.differences(meta["config"], self.config)
        if changed:
            raise ConfigError(f"{self.output_dir} holds an unfinished run of another config ({'; '.join(changed[:3])}"
                              f"{'; ...' if len(changed) > 3 else ''}); resume it with its own settings, or give this "
                              "run its own folder (hydra.run.dir=...)")
        device = next(iter(self.global_state.values())).device

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}

        self.global_state = part("global/")
        if self.personal is not None:
            self.personal = part("personal/")
        self.server.load_moments({name: part(f"strategy/{name}/") for name in self.server.MOMENTS
                                  if any(k.startswith(f"strategy/{name}/") for k in tensors)})
        count = len({k.split("/")[1] for k in tensors if k.startswith("best/")})
        if meta.get("best_is_current", meta.get("best_is_global")):  # (the key of checkpoints of an older fedclip)
            states = [{k: v.clone() for k, v in s.items()} for s in self.client_states()[1]]
        else:
            states = [part(f"best/{i}/") for i in range(count)]
        self.best = {"row": meta["best_row"], "score": meta["best_score"], "states": states}
        self.dropped = dict(meta.get("dropped", {}))
        self.done = int(meta["round"])
        log.info("resuming %s after round %d of %d", self.output_dir, self.done, self.rounds)
        return self.done

    def finished(self) -> None:
        """The summary is written: the checkpoint is no longer needed."""
        checkpoint.remove(self.output_dir)

    # --- the summary

    def summary_fields(self) -> dict:
        """summary.json's result fields: the selected round's accuracies, per client, per domain, spread."""
        best = self.best["row"]
        test = best.get("test_acc", {})
        clients = [c for c in self.clients if c.name in test]  # (Flower: less those dropped by then)
        domains: dict[str, list[float]] = {}
        for c in clients:
            domains.setdefault(c.domain, []).append(test[c.name])
        per_domain = {d: mean(v) for d, v in domains.items()}
        target = best.get("target_acc")
        values = list(test.values())
        return {
            "best_round": best["round"], "val_mean": best["val_mean"], "val_acc": best["val_acc"],
            "generalization": target, "personalization": test, "personalization_mean": mean(values),
            "personalization_domains": per_domain,
            "personalization_spread": {"mean": mean(values), "worst": min(values),
                                       "p10": float(np.percentile(values, 10))},
            "overall": mean(([target] if target is not None else []) + list(per_domain.values())),
            "clients": {c.name: {"domain": c.domain, "val": best["val_acc"][c.name], "test": test[c.name],
                                 "sizes": c.sizes} for c in clients},
            "clients_per_round": self.per_round, "selection": self.rule,
            "selection_label": selection.LABELS[self.rule],
            **({"dropped_clients": dict(self.dropped)} if self.dropped else {}),
        }

