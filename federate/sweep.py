"""A sweep's points trained as one computation (`hydra/launcher=batched`, hydra_plugins/fedclip_launcher).

Points that differ only in `lr`, `seed`, `target_domain`, `split_file` and `method.mu` (same cache, method,
adapter, strategy, rounds, local epochs, batch size, loss, precision, engine, device) form a group. Every
(point, client) pair of a group is one slot: slots of the same (lr, mu) share one trainer of the engine
(in lock step on CUDA, one slot after another on a CPU, as `engine=auto` trains the clients of one run),
over the cache loaded once. After each round every point does what a run alone does (federate/run.py:
aggregation, validation, model selection, history.jsonl) on its own slots, so each point reaches the same
numbers and writes the same files as it would alone: same splits (seed, domain), batch order
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

from . import checkpoint, experiment, methods, prepared
from .engine import ClientSets, make_trainer
from .errors import ConfigError
from .experiment import progress_bar
from .federation import Update
from .run import CachedBackend, conclude, generators, setup
from .sweep_folder import finished_summary

log = logging.getLogger("federate")
progress_log = logging.getLogger("federate_sweep")  # not under "federate": shown while a group's lines are held
FREE_KEYS = ("lr", "seed", "target_domain", "split_file")  # and method.mu: what may differ inside a group


def group_key(cfg) -> str | None:
    """Points with equal keys can train together; None: this point runs on its own."""
    try:
        method = methods.get(cfg.method.name)
        experiment.check_settings(cfg)
    except (ConfigError, Exception):  # noqa: BLE001 - its own job reports the error
        return None
    if cfg.backend != "local" or method.trains == "none" or method.images:
        return None
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
                    results[key] = conclude(point, start)
                except (ConfigError, OSError) as e:
                    results[key] = e
    for key in keys:
        if key in results:
            prepared.put(key, _replay(records.of.get(key, []), results[key], key))


def _rounds(points: dict, results: dict, records: _Records) -> None:
    """The rounds of all points: one trainer per (lr, mu) over its slots, then each point's round end
    (federate/federation.py: aggregation, evaluation, selection, records, checkpoint)."""
    live = list(points)
    if not live:
        return
    first = points[live[0]][0]
    cfg = first.cfg
    # slots: (point key, client index), grouped by the settings a trainer takes as one scalar
    by_settings = defaultdict(list)
    for key in live:
        point = points[key][0]
        for i in range(len(point.train_sets)):
            by_settings[point.settings].append((key, i))
    # largest training set first (the lock-step order); a stable sort keeps the sweep's order otherwise
    subgroups = [sorted(slots, key=lambda s: -len(points[s[0]][0].train_sets[s[1]])) for slots in by_settings.values()]
    built: dict[int, tuple] = {}  # subgroup -> (the slots its trainer was built for, the trainer)
    backends = {key: CachedBackend(points[key][0]) for key in live}
    rounds, started = int(cfg.rounds), time.time()
    bar = progress_bar(rounds, desc=f"{len(live)} points")
    for r in range(1, rounds + 1):
        sampled = {k: points[k][0].federation.sample(r) for k in live}  # clients_per_round: each point its own
        chosen = {k: set(v) for k, v in sampled.items()}
        for g, slots in enumerate(subgroups):
            slots = [(k, i) for k, i in slots if i in chosen[k]]
            settings = points[slots[0][0]][0].settings
            if g not in built or built[g][0] != slots:  # all clients, by default: built once
                sets = [points[k][0].train_sets[i] for k, i in slots]
                built[g] = (slots, make_trainer(cfg.engine, first.adapter, ClientSets(sets), first.text,
                                                first.cache.logit_scale, settings))
            trainer = built[g][1]
            rows = defaultdict(list)  # point -> its slots' rows in the trainer's state, in the point's client order
            for row, (k, i) in sorted(enumerate(slots), key=lambda e: e[1][1]):
                rows[k].append(row)
            feds = {k: points[k][0].federation for k in rows}
            starts = {k: f.start_states(sampled[k]) for k, f in feds.items()}  # [M, ...]: the sampled clients'
            at = {k: {i: j for j, i in enumerate(sampled[k])} for k in rows}
            state = {q: torch.stack([starts[k][q][at[k][i]] for k, i in slots]) for q in first.federation.global_state}
            gens = [generators(points[k][0], r, [feds[k].units[i]])[0] for k, i in slots]
            anchor = ({q: torch.stack([feds[k].global_state[q] for k, _ in slots]) for q in state}
                      if settings.mu else None)
            losses = trainer.train(state, int(cfg.local_epochs), gens, anchor=anchor).tolist()
            for key, idx in rows.items():
                if key in results:  # it failed in an earlier round; its slots train on, unread
                    continue
                point, fed = points[key][0], feds[key]
                stacked = {q: v.index_select(0, torch.tensor(idx, device=v.device)) for q, v in state.items()}
                update = Update(stacked, [len(point.train_sets[i]) for i in sampled[key]],
                                {fed.units[i]: losses[j] for i, j in zip(sampled[key], idx)})
                with records.point(key):
                    try:
                        fed.end_round(r, sampled[key], update, backends[key])
                    except (ConfigError, OSError) as e:  # this point fails; the others go on
                        results[key] = e
        if bar is not None:
            bar.update(1)
        elif r == rounds or r % max(1, rounds // 10) == 0:  # without a terminal: a line every tenth round
            progress_log.info("group of %d points: round %d/%d (%.0f s)", len(live), r, rounds, time.time() - started)
    if bar is not None:
        bar.close()
