"""A sweep's points trained as one computation (`hydra/launcher=batched`, hydra_plugins/fedclip_launcher).

Points that differ only in `lr`, `seed`, `target_domain`, `split_file` and `method.mu` (same cache, method,
adapter, strategy, rounds, local epochs, batch size, loss, precision, engine, device) form a group. Every
(point, client) pair of a group is one slot: slots of the same (lr, mu) share one trainer of the engine
(in lock step on CUDA, one slot after another on a CPU, as `engine=auto` trains the clients of one run),
over the cache loaded once. After each round every point does what a run alone does (federate/run.py:
aggregation, validation, model selection, history.jsonl) on its own slots, so each point reaches the same
numbers and writes the same files as it would alone (a method's exchange after the rounds, CCVR's
calibration, runs for each point on its own, as alone): same splits (seed, domain), batch order
(`client_generator(seed, client, round)`), initial adapter (seed) and Adam steps per slot.

The launcher then runs every job through Hydra's `run_job` as usual (job folder, .hydra/, log file,
callbacks); `federate.run.run` finds the point's prepared result (federate/prepared.py), replays its log lines
into the job's log (stamped with the replay's time, so the file stays in order; the console skips their
per-round lines) and returns its summary, or raises its error. While a group trains, the console shows one
progress bar over its rounds on a terminal, and otherwise a line every tenth round. Points that cannot be grouped (other
backends, zero-shot, the image backbones, or a settings error) run as usual.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

from . import checkpoint, experiment, prepared, privacy
from .engine import ClientSets, make_trainer
from .errors import ConfigError
from .experiment import progress_bar
from .federation import sigterm_as_interrupt
from .lifecycle import conclude
from .run import CachedBackend, setup
from .sweep_folder import finished_summary
from .training import LocalTraining, Update

log = logging.getLogger("federate")
progress_log = logging.getLogger("federate_sweep")  # not under "federate": shown while a group's lines are held
FREE_KEYS = ("lr", "seed", "target_domain", "split_file")  # and method.mu: what may differ inside a group


def group_key(cfg) -> str | None:
    """Points with equal keys can train together; None: this point runs on its own."""
    try:
        method = experiment.check_settings(cfg)
    except Exception:  # noqa: BLE001 - its own job reports the error
        return None
    if cfg.backend != "local" or not method.groupable(cfg) or cfg.get("privacy", {}).get("name") == "dp_client":
        return None  # (DP-FedAvg's rounds may sample no client: its points run alone)
    c = OmegaConf.to_container(cfg, resolve=True)
    for key in FREE_KEYS:
        c.pop(key, None)
    c["method"].pop("mu", None)
    return json.dumps(c, sort_keys=True, default=str)


def groups(cfgs: list) -> list[list[int]]:
    """Indices of the points that train together (lists of 2 or more), in sweep order."""
    by_key = defaultdict(list)
    for i, cfg in enumerate(cfgs):
        key = group_key(cfg)
        if key is not None:
            by_key[key].append(i)
    return [ids for ids in by_key.values() if len(ids) > 1]


class _Records(logging.Handler):
    """Holds the `federate` log records of each point while a group trains."""

    def __init__(self):
        super().__init__()
        self.of: dict[str, list] = defaultdict(list)
        self.current: str | None = None

    def emit(self, record):
        if self.current is not None:
            self.of[self.current].append(record)

    @contextlib.contextmanager
    def point(self, key: str):
        self.current = key
        try:
            yield
        finally:
            self.current = None


@contextlib.contextmanager
def _captured_logs():
    logger = logging.getLogger("federate")
    records, propagate = _Records(), logger.propagate
    logger.addHandler(records)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(records)
        logger.propagate = propagate


def _replay(records: list, result, output_dir: str) -> Callable[[], dict]:
    def replay():
        if records:
            log.info("trained in a group of sweep points from %s to %s; its lines follow, with the time of this job",
                     time.strftime("%H:%M:%S", time.localtime(records[0].created)),
                     time.strftime("%H:%M:%S", time.localtime(records[-1].created)))
        for record in records:
            now = time.time()  # the job's log stays in time order
            record.created, record.msecs, record.grouped = now, (now - int(now)) * 1000, True
            logging.getLogger(record.name).handle(record)
        if isinstance(result, BaseException):
            raise result
        os.utime(Path(output_dir) / "summary.json")  # written during this job, as far as the sweep can tell
        return result
    return replay


def train_group(cfgs: list, output_dirs: list) -> None:
    """Train the points `cfgs` together and keep each one's result for its job (federate/prepared.py)."""

    keys = [os.path.abspath(d) for d in output_dirs]
    results: dict[str, object] = {}
    points: dict[str, object] = {}
    with _captured_logs() as records:
        for cfg, key in zip(cfgs, keys):
            if checkpoint.exists(Path(key)) or finished_summary(Path(key), cfg) is not None:
                continue  # an interrupted point resumes in its own job; a finished one is kept by it
            with records.point(key):
                try:
                    start = time.time()
                    Path(key).mkdir(parents=True, exist_ok=True)
                    points[key] = (setup(cfg, experiment.check_settings(cfg), Path(key), progress=False), start)
                except (ConfigError, OSError) as e:
                    results[key] = e
        try:
            _rounds(points, results, records)
        finally:
            for key, (point, _) in points.items():
                point.federation.runlog.close()
        for key, (point, start) in points.items():
            if key in results:
                continue
            with records.point(key):
                try:
                    results[key] = conclude(point.experiment, start)
                except (ConfigError, OSError) as e:
                    results[key] = e
    for key in keys:
        if key in results:
            prepared.put(key, _replay(records.of.get(key, []), results[key], key))


def _rounds(points: dict, results: dict, records: _Records) -> None:
    """Every point's rounds (`Federation.steps`, the loop a run alone runs), answered together: each round,
    the sampled clients of all points whose method settings agree (same lr and mu) are one computation
    (`_train_together`); each point then concludes its round (aggregation, evaluation, selection,
    records, checkpoint) on its own."""
    backends = {key: CachedBackend(points[key][0]) for key in points}
    steps = {key: points[key][0].federation.steps(backends[key]) for key in points}
    requests = {}
    for key in list(steps):
        _advance(key, steps, requests, results, records, None)
    if not requests:
        return
    first = points[next(iter(points))][0]
    rounds, started = first.federation.rounds, time.time()
    bar = progress_bar(rounds, desc=f"{len(points)} points")
    trainers: dict = {}  # settings -> (slots, engine): built once while the slots stay the same
    with sigterm_as_interrupt():
        while requests:
            r = next(iter(requests.values()))[0]
            if isinstance(r, int):
                updates = _train_together({k: (points[k][0], sampled) for k, (_, sampled) in requests.items()}, r,
                                          trainers)
            else:  # the method's exchange after the rounds, once: each point as it runs alone (its own numbers)
                updates = {k: backends[k].train(points[k][0].federation, r, sampled) for k, (_, sampled) in
                           requests.items()}
            for key, update in updates.items():
                _advance(key, steps, requests, results, records, update)
            if not isinstance(r, int):  # the method's exchange after the rounds (Method.after_rounds)
                progress_log.info("group of %d points: %s (%.0f s)", len(points), r, time.time() - started)
            elif bar is not None:
                bar.update(1)
            elif r == rounds or r % max(1, rounds // 10) == 0:  # without a terminal: a line every tenth round
                progress_log.info("group of %d points: round %d/%d (%.0f s)", len(points), r, rounds,
                                  time.time() - started)
    if bar is not None:
        bar.close()


def _advance(key, steps, requests, results, records, update) -> None:
    """Hand a point's loop its update (None: start it); keep its next request, or its error."""
    requests.pop(key, None)
    with records.point(key):
        try:
            requests[key] = steps[key].send(update) if update is not None else next(steps[key])
        except StopIteration:
            pass
        except (ConfigError, OSError) as e:  # this point fails; the others go on
            results[key] = e


def _train_together(requests: dict, round_: int, trainers: dict) -> dict:
    """One round's local training of every point's sampled clients: the slots (point, client) of points with
    the same train settings share one engine; each point's method runs its local update on them (every
    point of a group has the same method settings but mu, which is part of the train settings)."""
    by_settings = defaultdict(list)
    for key, (point, sampled) in requests.items():
        by_settings[point.settings].extend((key, i) for i in sampled)
    updates = {}
    for settings, slots in by_settings.items():
        # largest training set first (the lock-step order); a stable sort keeps the sweep's order otherwise
        slots.sort(key=lambda s: -len(requests[s[0]][0].train_sets[s[1]]))
        first = requests[slots[0][0]][0]

        def engine(s, slots=slots, first=first):  # one per settings (a method's phase may change them)
            if s not in trainers or trainers[s][0] != slots:  # all clients, by default: built once
                sets = ClientSets([requests[k][0].train_sets[i] for k, i in slots])
                trainers[s] = (list(slots), make_trainer(first.cfg.engine, first.adapter, sets, first.text,
                                                         first.cache.logit_scale, s))
            return trainers[s][1]

        feds = {k: requests[k][0].federation for k, _ in slots}
        at = {k: {i: j for j, i in enumerate(requests[k][1])} for k in feds}
        personal = {k: f.personal_of(requests[k][1]) for k, f in feds.items()}
        shared = {q: torch.stack([feds[k].global_state[q] for k, _ in slots]) for q in first.federation.global_state}
        mine = {q: torch.stack([personal[k][q][at[k][i]] for k, i in slots]) for q in first.federation.personal}
        train = LocalTraining([(int(requests[k][0].cfg.seed), feds[k].units[i]) for k, i in slots],
                              [len(requests[k][0].train_sets[i]) for k, i in slots], round_,
                              int(first.cfg.local_epochs), settings, engine, weights=None, shared_is_common=False,
                              labels=[str(j) for j in range(len(slots))],
                              budget=privacy.budget(first.cfg, first.method, "train"),
                              rows=[requests[k][0].train_sets[i] for k, i in slots])
        update = first.method.local_update(train, shared, mine)
        row_of = {slot: j for j, slot in enumerate(slots)}
        for key, fed in feds.items():
            sampled = requests[key][1]
            rows = [row_of[(key, i)] for i in sampled]
            idx = torch.tensor(rows, device=next(iter({**shared, **mine}.values())).device)
            for q, v in personal[key].items():
                v.copy_(mine[q].index_select(0, idx))
            fed.store_personal(sampled, personal[key])
            updates[key] = Update({q: v.index_select(0, idx) for q, v in update.stacked.items()},
                                  [update.num_examples[j] for j in rows],
                                  {fed.units[i]: update.losses[str(j)] for i, j in zip(sampled, rows)})
    return updates
