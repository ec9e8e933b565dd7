"""The rounds of one federated run (`Federation`), whatever trains the clients.

Each round r: a seeded sample of the training units trains (`clients_per_round`; all by default) by the
run's method (federate/methods/: its local update, from the shared state and each client's personal
state); the method combines what they send through the server strategy; every client is evaluated
(validation and test, with the model it deploys, and the target domain with the method's target models);
the round's record goes to history.jsonl; the selection rule (`selection=`, federate/selection.py) keeps
the best round so far; a checkpoint (federate/checkpoint.py) lets a killed run resume after its last round.

The loop itself is `Federation.steps`, a generator: it yields (round, sampled units) when local training
is due and takes the units' `Update` back. `Federation.run` answers it with a backend; a grouped sweep
(federate/sweep.py) answers many runs' requests with one computation. A backend has

    train(federation, round, sampled) -> Update     # local training of the sampled units
    evaluate(federation, parts) -> {"val": {client: acc}, "test": {...}, "target": [acc per target model]}

and is the cached tensors in process (federate/run.py), the Flower apps (federate/flower/server_app.py)
or the image backbones (federate/backbone/runner.py).
"""
from __future__ import annotations

import logging
import math
import shlex
import signal
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from . import checkpoint, privacy, selection
from .errors import ConfigError
from .experiment import RunLog, check_finite, mean
from .training import Update

log = logging.getLogger("federate")
PARTS = ("val", "test", "target")
# A method that evaluates the target domain with more models than this (`local`: every client's) does so in
# the rounds the selection keeps only: 300 clients' models on a whole domain cost more than their training.
MANY_TARGET_MODELS = 8


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during the rounds; the message says how to resume."""


@dataclass(frozen=True)
class ClientInfo:
    name: str
    domain: str
    sizes: dict  # "train" | "val" | "test" -> rows


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


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


def recorded(output_dir: Path) -> bool:
    """Whether the folder holds a run's records: a summary, or a history with a complete round."""
    history = output_dir / "history.jsonl"
    return (output_dir / "summary.json").exists() or (history.is_file() and "\n" in history.read_text()) \
        or history.is_symlink()


def drive(steps, train) -> None:
    """Answer a `Federation.steps` generator's requests with `train(round, sampled)` until its rounds end."""
    try:
        request = next(steps)
        while True:
            request = steps.send(train(*request))
    except StopIteration:
        return


class Federation:
    """One run's rounds and records. `clients`: every client, evaluated each round; the training units are
    the method's (`method.units`: one per client, or one pooled unit). `init_state`: the model's initial
    state, which the method splits into the shared state and each client's personal one (held here unless
    the clients keep their own: `keeps_personal=False`, Flower)."""

    def __init__(self, cfg, method, clients: list[ClientInfo], init_state: dict, server, output_dir: Path, *,
                 target: str | None, progress: bool = True, every_round: bool = True, keeps_personal: bool = True,
                 inputs: dict | None = None, known_clients: list[str] | None = None):
        self.cfg, self.method, self.clients, self.server = cfg, method, clients, server
        self.output_dir, self.target, self.every_round = Path(output_dir), target, every_round
        self.rounds = method.rounds(cfg)
        self.rule = selection.check_rule(cfg.get("selection", "val_mean"))
        if self.rule == "oracle" and target is None:
            raise ConfigError("selection=oracle selects by the target domain's accuracy, and this run has no "
                              "target domain; use selection=val_mean")
        self.unit_members = method.units(clients)
        self.units = [clients[m[0]].name if len(m) == 1 else "pooled" for m in self.unit_members]
        self.unit_rows = [sum(clients[i].sizes["train"] for i in m) for m in self.unit_members]
        self.per_round = (check_clients_per_round(cfg.get("clients_per_round"), len(clients))
                          if self.rounds and len(self.units) == len(clients) else None)
        # privacy (federate/privacy.py): planned before anything trains; a run beyond its epsilon stops here
        self.private = privacy.kind(cfg)
        self.privacy = privacy.for_run(cfg, method, clients, self.units, self.unit_members, self.unit_rows,
                                       lambda r: sample(cfg.seed, r, len(self.units), self.per_round), self.rounds,
                                       self.per_round)
        self.global_state, personal = method.split(init_state)
        self.personal_params = sum(v.numel() for v in personal.values())  # one client's
        self.personal = {k: v.expand(len(clients), *v.shape).clone() for k, v in personal.items()} \
            if keeps_personal else {}
        self.best = {"row": None, "score": -math.inf, "shared": {}, "personal": {}}
        self.dropped: dict[str, str] = {}  # client -> why the server dropped it (Flower)
        self.before: dict | None = None  # the selected round's row, once an exchange after the rounds replaced it
        self.done = 0  # the last completed round
        self.current_round = 0  # the round being concluded
        self.config = config_dict(cfg)
        self.inputs = dict(inputs or {})  # what the run computes on: a resume on anything else is refused
        self.known_clients = known_clients or [c.name for c in clients]  # (Flower: those that did not register too)
        resumed = self._resume()
        if resumed is None and self.rounds and not recorded(self.output_dir):
            # round 0, before history.jsonl exists: a run stopped before its first round resumes from here
            self._save_checkpoint()
            resumed = 0
        self.runlog = RunLog(self.output_dir, max(self.rounds, 1), progress, resume_round=resumed)

    # --- the rounds

    def steps(self, backend):
        """The remaining rounds: yields (round, sampled units) when they must train and takes their Update
        back (generator.send); evaluates, records and checkpoints each round. A method without rounds is
        evaluated once (round 0)."""
        if self.rounds == 0:
            self.end_round(0, [], None, backend)
        for r in range(self.done + 1, self.rounds + 1):
            sampled = self.sample(r)
            # (DP-FedAvg's Poisson sample may hold no client: the round still releases its noisy mean)
            update = (yield r, sampled) if sampled else Update({}, [], {})
            self.end_round(r, sampled, update, backend)
        step = self.method.after_rounds() if self.rounds else None
        if step and self.best["row"] is not None:
            yield from self._after_rounds(step, backend)

    def _after_rounds(self, step: str, backend):
        """The method's exchange after the rounds (`Method.after_rounds`), on the selected round's states:
        requested from the backend as a round tagged `step` with every client that is still in; the final
        state it makes is evaluated and becomes what the summary reports (`self.before`: the selected
        round's own row). It is not checkpointed: a resumed run does it again."""
        selected = self.best["row"]
        self.global_state, self.personal = clone(self.best["shared"]), clone(self.best["personal"])
        sampled = [i for i, u in enumerate(self.units) if u not in self.dropped]
        self.current_round = step
        update = yield step, sampled
        row = {"round": selected["round"], "after_rounds": step, "sampled": [self.units[i] for i in sampled],
               "train_loss": dict(update.losses) if update else {}}
        if update is not None and update.num_examples:
            check_finite(self.done, {}, update.stacked, self.cfg.lr)
            self.global_state = self.method.aggregate(self.server, self.global_state, update)
            check_finite(self.done, {}, self.global_state, self.cfg.lr)
        else:
            row["skipped"] = "no client answered"
        self._record(row, backend.evaluate(self, set(PARTS) if self.target is not None else {"val", "test"}))
        log.info("%s after round %d (the selected round): validation %.4f, before %.4f", step, selected["round"],
                 row["val_mean"], selected["val_mean"])
        self.before = selected
        self.best = {"row": row, "score": selection.score(row, self.rule), "shared": clone(self.global_state),
                     "personal": clone(self.personal)}

    def run(self, backend) -> None:
        """Every remaining round, trained by `backend`."""
        try:
            with sigterm_as_interrupt():
                drive(self.steps(backend), lambda r, sampled: backend.train(self, r, sampled))
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted after round {self.done} of {self.rounds}; resume with: "
                              f"{resume_command(self.output_dir)}") from None
        finally:
            self.runlog.close()

    @property
    def trained_per_round(self) -> int:
        """How many units train, and communicate, each round (`clients_per_round`; all by default)."""
        return self.per_round or len(self.units)

    def sample(self, round_: int) -> list[int]:
        """Indices of the units that train in this round (clients the server dropped never do)."""
        alive = [i for i, u in enumerate(self.units) if u not in self.dropped]
        if self.private == "dp_client":  # DP-FedAvg: each unit joins with probability q (Poisson)
            rate = (self.per_round or len(self.units)) / len(self.units)
            return [alive[i] for i in privacy.poisson_sample(self.cfg.seed, round_, len(alive), rate)]
        return [alive[i] for i in sample(self.cfg.seed, round_, len(alive), self.per_round)]

    def personal_of(self, sampled: list[int]) -> dict[str, torch.Tensor]:
        """The sampled clients' personal states [M, ...]: the held tensors themselves when every client is
        sampled (trained in place), else a copy that `store_personal` writes back."""
        if not self.personal or sampled == list(range(len(self.clients))):
            return self.personal
        idx = torch.tensor(sampled, device=next(iter(self.personal.values())).device)
        return {k: v.index_select(0, idx) for k, v in self.personal.items()}

    def store_personal(self, sampled: list[int], personal: dict[str, torch.Tensor]) -> None:
        if not personal or all(personal[k] is v for k, v in self.personal.items()):
            return
        idx = torch.tensor(sampled, device=next(iter(self.personal.values())).device)
        for k, v in self.personal.items():
            v.index_copy_(0, idx, personal[k])

    def end_round(self, r: int, sampled: list[int], update: Update | None, backend) -> None:
        """After round r's local training: the server's combination, evaluation, selection, records, checkpoint."""
        self.current_round = r
        if hasattr(self.server, "start_round"):  # (DP-FedAvg draws the round's noise from the seed and the round)
            self.server.start_round(r)
        losses = dict(update.losses) if update else {}
        # DP-SGD protects what a client sends; its training loss is not private: it stays on the client
        row = {"round": r, "sampled": [self.units[i] for i in sampled],
               "train_loss": None if self.private == "dpsgd" else losses}
        # (Flower: every sampled client may have been dropped; DP-FedAvg releases a noisy mean all the same)
        if update is not None and (update.num_examples or self.private == "dp_client"):
            check_finite(r, losses, update.stacked, self.cfg.lr)
            self.global_state = self.method.aggregate(self.server, self.global_state, update)
            check_finite(r, {}, self.global_state, self.cfg.lr)
            if self.personal:
                check_finite(r, {}, self.personal, self.cfg.lr)
        self._evaluate(row, backend)
        if self.privacy is not None:  # the privacy spent so far (this round's training and deployed models)
            row["privacy"] = self.privacy.end_round(r, sampled)
        row.update(getattr(backend, "row_timings", dict)())  # the image backbones: the round's seconds
        self.done = r
        self.runlog.end_round(row, max(self.rounds, 1), self.best["row"])
        if self.rounds:
            self._save_checkpoint()

    def _evaluate(self, row: dict, backend) -> None:
        wanted = set(PARTS) if self.every_round or self.rule == "last" else \
            {"val", *(["target"] if self.rule == "oracle" else [])}
        if self.rule not in ("oracle", "last") and self.personal and \
                len(self.method.target_models(self.global_state, self.personal)) > MANY_TARGET_MODELS:
            wanted.discard("target")  # (many models on the whole target domain: only the selected rounds)
        if self.target is None:
            wanted.discard("target")
        self._record(row, backend.evaluate(self, wanted))
        score = selection.score(row, self.rule)
        improved = score > self.best["score"]
        missing = {"test", *(["target"] if self.target is not None else [])} - wanted
        if improved and missing:  # a backend that evaluates only when needed: the selected round's numbers
            self._record(row, backend.evaluate(self, missing))
        if improved:
            row["improved"] = True
            self.best = {"row": row, "score": score, "shared": clone(self.global_state),
                         "personal": clone(self.personal)}

    def _record(self, row: dict, result: dict) -> None:
        """`result`: {"val": {client: acc}, "test": {client: acc}, "target": [acc per target model]}."""
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
        out.update({f"personal/{k}": v for k, v in self.personal.items()})
        for name, state in self.server.moments().items():
            out.update({f"strategy/{name}/{k}": v for k, v in state.items()})
        if not self._best_is_current():
            out.update({f"best/global/{k}": v for k, v in self.best["shared"].items()})
            out.update({f"best/personal/{k}": v for k, v in self.best["personal"].items()})
        return out

    def _best_is_current(self) -> bool:
        """The selected round is the last one: its states are the current ones, saved once (a backbone's
        state weighs hundreds of MB, 300 personal adapters 630 MB)."""
        return self.best["row"] is not None and self.best["row"]["round"] == self.done

    def _save_checkpoint(self) -> None:
        meta = {"config": self.config, "inputs": self.inputs, "best_row": self.best["row"],
                "best_score": self.best["score"], "best_is_current": self._best_is_current(), "dropped": self.dropped,
                "privacy": self.privacy.state() if self.privacy is not None else None}
        checkpoint.save(self.output_dir, self.done, self._tensors(), meta)

    def _resume(self) -> int | None:
        """Restore the last completed round from the folder's checkpoint, if it has one of this run: the
        same config and the same inputs (cache, splits); every field and tensor verified."""
        if (self.output_dir / "summary.json").exists() or not checkpoint.exists(self.output_dir):
            return None  # RunLog refuses a finished run's folder
        meta, tensors = checkpoint.load(self.output_dir)
        changed = checkpoint.differences(meta["config"], self.config) if isinstance(meta.get("config"), dict) else []
        if changed:
            raise ConfigError(f"{self.output_dir} holds an unfinished run of another config ({'; '.join(changed[:3])}"
                              f"{'; ...' if len(changed) > 3 else ''}); resume it with its own settings, or give this "
                              "run its own folder (hydra.run.dir=...)")
        changed = checkpoint.differences(meta.get("inputs") or {}, self.inputs)
        if changed:
            raise ConfigError(f"{self.output_dir} holds an unfinished run on other inputs ({'; '.join(changed[:2])}"
                              f"{'; ...' if len(changed) > 2 else ''}): the cache or the splits changed since; give "
                              "this run its own folder (hydra.run.dir=...), or remove its checkpoint* to start it over")
        checkpoint.check_record(self.output_dir, meta, self.rounds, self.known_clients)
        current = meta["best_is_current"] or meta["best_row"] is None
        expected = {f"global/{k}": v for k, v in self.global_state.items()}
        expected.update({f"personal/{k}": v for k, v in self.personal.items()})
        if not current:
            expected.update({f"best/{k}": v for k, v in expected.items()})
        checkpoint.check_tensors(self.output_dir, tensors, expected,
                                 optional=tuple(f"strategy/{name}/" for name in self.server.MOMENTS))
        device = next(iter({**self.global_state, **self.personal}.values())).device

        def part(prefix: str, like: dict) -> dict[str, torch.Tensor]:  # in the run's own key order
            return {k: tensors[prefix + k].to(device) for k in like}

        self.global_state = part("global/", self.global_state)
        self.personal = part("personal/", self.personal)
        self.server.load_moments({name: part(f"strategy/{name}/", self.global_state) for name in self.server.MOMENTS
                                  if any(k.startswith(f"strategy/{name}/") for k in tensors)})
        if current:
            shared, personal = clone(self.global_state), clone(self.personal)
        else:
            shared, personal = part("best/global/", self.global_state), part("best/personal/", self.personal)
        self.best = {"row": meta["best_row"], "score": meta["best_score"] if meta["best_row"] else -math.inf,
                     "shared": shared, "personal": personal}
        self.dropped = dict(meta["dropped"])
        if self.privacy is not None:
            try:
                self.privacy.load(meta.get("privacy"))
            except (ValueError, TypeError) as e:
                raise checkpoint.Damaged(self.output_dir, str(e)) from None
        self.done = int(meta["round"])
        log.info("resuming %s after round %d of %d", self.output_dir, self.done, self.rounds)
        return self.done

    def finished(self) -> None:
        """The summary is written: the checkpoint is no longer needed."""
        checkpoint.remove(self.output_dir)

    # --- the summary

    def privacy_fields(self) -> dict:
        """summary.json's privacy: the mechanism and what the whole run spent (epsilon: the worst client's
        for DP-SGD, whose `epsilon_clients` has each; null when infinite), and epsilon and delta at the top."""
        if self.privacy is None:
            return {"privacy": {"name": "none"}}
        spent = self.privacy.record()
        return {"privacy": {**self.privacy.describe(), **spent}, "epsilon": spent["epsilon"], "delta": spent["delta"]}

    def summary_fields(self) -> dict:
        """summary.json's result fields: the selected round's accuracies, per client, per domain, spread
        (federate.selection.results, which the report's re-selection uses too)."""
        best = self.best["row"]
        test = best.get("test_acc", {})
        clients = [c for c in self.clients if c.name in test]  # (Flower: less those dropped by then)
        domains = {c.name: c.domain for c in self.clients}
        after = {}
        if self.before is not None:  # the exchange after the rounds made the reported state
            before = self.before
            after = {"after_rounds": best["after_rounds"],
                     f"before_{best['after_rounds']}": selection.results(
                         before, {c: domains[c] for c in before["test_acc"]})}
        return {
            **selection.results(best, {c.name: c.domain for c in clients}), **after,
            "clients": {c.name: {"domain": c.domain, "val": best["val_acc"][c.name], "test": test[c.name],
                                 "sizes": c.sizes} for c in clients},
            "clients_per_round": self.per_round, "selection": self.rule,
            "selection_label": selection.LABELS[self.rule],
            **self.privacy_fields(),
            **({"dropped_clients": dict(self.dropped)} if self.dropped else {}),
        }
