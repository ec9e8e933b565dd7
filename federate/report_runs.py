"""The runs under a folder, as `python -m federate.report` reads them: each summary.json checked field by
field, each history.jsonl read line by line, and every run that cannot be read (or never finished)
listed with the reason, instead of stopping the report.

Runs of older fedclip versions lack the newer keys (cache identity, clients, partition, selection,
full-metric histories); they are read as they are.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .inputs import MiB, Unreadable, loads, read_bytes, read_text
from .selection import RULES

REQUIRED = ("method", "dataset", "target_domain", "seed", "lr", "val_mean", "generalization", "personalization",
            "personalization_mean", "overall")
MAX_SUMMARY_BYTES = 64 * MiB  # a summary of 10,000 clients is a few MB
MAX_HISTORY_BYTES = 512 * MiB  # 300 clients x 1,000 rounds is about 200 MB
MAX_LOG_BYTES = 1 * MiB  # of a log, its last MiB is read (the last error is at the end)
MAX_HYDRA_BYTES = 1 * MiB
# Hydra's file log format: [time][logger][LEVEL] - message
LOG_LINE = re.compile(r"^\[[^\]]*\]\[[^\]]*\]\[(?P<level>[A-Z]+)\] - (?P<message>.*)$")


@dataclass
class Broken:
    """A run folder without usable results, and why."""
    folder: Path
    why: str


@dataclass
class Sweep:
    """A sweep's folder (it holds Hydra's multirun.yaml): its jobs that finished, of those it plans."""
    folder: Path
    finished: int
    planned: int | None  # None: multirun.yaml cannot tell (a glob sweep); `started` is then all we know
    started: int

    def line(self) -> str:
        if self.planned is None:
            return (f"sweep {self.folder}: {self.finished} of {self.started} started jobs finished (its multirun.yaml "
                    "does not say how many it plans)")
        return f"sweep {self.folder}: {self.finished} of {self.planned} jobs finished"


@dataclass
class Runs:
    summaries: list[dict] = field(default_factory=list)  # each with "_dir", "_mtime" and "_history"
    broken: list[Broken] = field(default_factory=list)
    sweeps: list[Sweep] = field(default_factory=list)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_accuracy(v) -> bool:
    return is_number(v) and 0 <= v <= 1


def is_accuracies(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and is_accuracy(a) for k, a in v.items())


def is_count(v) -> bool:
    """An integer >= 0 (a bool is not a number)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def shown(v) -> str:
    return json.dumps(v)[:60]


def summary_problem(s) -> str | None:
    """What is wrong with a parsed summary.json, or None when the report can use it."""
    if not isinstance(s, dict):
        return f"it holds a {type(s).__name__}, not a JSON object"
    missing = [k for k in REQUIRED if k not in s]
    if missing:
        return f"it lacks {', '.join(missing)}"
    checks = [
        ("method", isinstance(s["method"], str) and s["method"], "a method name"),
        ("dataset", isinstance(s["dataset"], str) and s["dataset"], "a dataset name"),
        ("model", isinstance(s.get("model", "?"), str), "a model name"),
        ("target_domain", s["target_domain"] is None or isinstance(s["target_domain"], str), "a domain name or null"),
        ("seed", isinstance(s["seed"], int) and not isinstance(s["seed"], bool), "an integer"),
        ("lr", is_number(s["lr"]) and s["lr"] > 0, "a positive number"),
        ("val_mean", is_accuracy(s["val_mean"]), "an accuracy in [0, 1]"),
        ("generalization", s["generalization"] is None or is_accuracy(s["generalization"]),
         "an accuracy in [0, 1] or null"),
        ("personalization", is_accuracies(s["personalization"]), "an object {client: accuracy in [0, 1]}"),
        ("personalization_mean", is_accuracy(s["personalization_mean"]), "an accuracy in [0, 1]"),
        ("overall", is_accuracy(s["overall"]), "an accuracy in [0, 1]"),
        ("personalization_domains", is_accuracies(s.get("personalization_domains", {})),
         "an object {domain: accuracy in [0, 1]}"),
        ("personalization_spread", s.get("personalization_spread") is None or (
            isinstance(s["personalization_spread"], dict)
            and all(is_accuracy(s["personalization_spread"].get(k)) for k in ("mean", "worst", "p10"))),
         "an object with accuracies mean, worst and p10"),
        # a run on a cache names it; a run on the images (the backbone baselines) names the images instead
        ("cache_identity_sha256", isinstance(s.get("cache_identity_sha256", ""), str)
         or (s.get("cache_identity_sha256") is None and isinstance(s.get("inputs_fingerprint"), str)),
         "a sha256 string (or null for a run on the images, with their inputs_fingerprint)"),
        ("cache_checksums", isinstance(s.get("cache_checksums") or {}, dict)
         and all(isinstance(k, str) and isinstance(v, str) for k, v in (s.get("cache_checksums") or {}).items()),
         "an object {dataset path: sha256}"),
        *[(k, s.get(k) is None or isinstance(s[k], str), "a sha256 string")
          for k in ("inputs_fingerprint", "model_fingerprint", "cache_inputs_fingerprint", "cache_model_fingerprint")],
        ("splits_sha256", s.get("splits_sha256") is None or isinstance(s["splits_sha256"], str), "a sha256 string"),
        ("partition", s.get("partition") is None or (isinstance(s["partition"], dict)
                                                     and isinstance(s["partition"].get("name"), str)),
         "an object with a name"),
        ("clients_per_round", s.get("clients_per_round") is None or (
            isinstance(s["clients_per_round"], int) and not isinstance(s["clients_per_round"], bool)),
         "an integer or null"),
        ("selection", s.get("selection", "val_mean") in RULES, f"one of {', '.join(RULES)}"),
        ("clients", s.get("clients") is None or isinstance(s["clients"], dict), "an object {client: ...}"),
        *[(k, s.get(k) is None or (isinstance(s[k], dict) and isinstance(s[k].get("name", ""), str)),
           "an object with a name") for k in ("adapter", "strategy", "optimizer")],
        ("backbone", s.get("backbone") is None or isinstance(s["backbone"], (str, dict)), "a name or an object"),
        ("val_acc", s.get("val_acc") is None or is_accuracies(s["val_acc"]), "an object {client: accuracy in [0, 1]}"),
        *[(k, s.get(k) is None or is_count(s[k]), "an integer >= 0")
          for k in ("rounds", "local_epochs", "batch_size", "finetune_epochs", "best_round")],
        ("mu", s.get("mu") is None or is_number(s["mu"]), "a finite number"),
        ("text_adapter", s.get("text_adapter") is None or isinstance(s["text_adapter"], bool), "true or false"),
    ]
    for key, ok, expected in checks:
        if not ok:
            return f"{key} is {shown(s.get(key))}, not {expected}"
    return None


def row_problem(row: dict, previous: int | None) -> str | None:
    """What is wrong with one round's record of history.jsonl (federate/selection.py: a history row), or
    None. Every number the report reads is checked: accuracies in [0, 1], finite losses, rounds that
    increase; a bool is not a number."""
    r = row.get("round")
    if not is_count(r):
        return f"round is {shown(r)}, not an integer >= 0"
    if previous is not None and r <= previous:
        return f"round {r} does not follow round {previous}"
    checks = [
        ("val_acc", is_accuracies(row.get("val_acc")) and row.get("val_acc"), "a non-empty object {client: accuracy in [0, 1]}"),
        ("val_mean", is_accuracy(row.get("val_mean")), "an accuracy in [0, 1]"),
        ("val_rows", "val_rows" not in row or is_accuracy(row["val_rows"]), "an accuracy in [0, 1]"),
        ("test_acc", "test_acc" not in row or is_accuracies(row["test_acc"]), "an object {client: accuracy in [0, 1]}"),
        ("target_acc", row.get("target_acc") is None or is_accuracy(row["target_acc"]), "an accuracy in [0, 1] or null"),
        ("train_loss", "train_loss" not in row or row["train_loss"] is None or (isinstance(row["train_loss"], dict) and all(
            isinstance(k, str) and is_number(v) for k, v in row["train_loss"].items())),
         "an object {client: finite number}, or null (privacy=dpsgd: the clients keep it)"),
        ("sampled", "sampled" not in row or (isinstance(row["sampled"], list)
                                             and all(isinstance(c, str) for c in row["sampled"])), "a list of client names"),
        *[(k, k not in row or (is_number(row[k]) and row[k] >= 0), "a number of seconds >= 0")
          for k in ("seconds", "train_seconds")],
    ]
    for key, ok, expected in checks:
        if not ok:
            return f"{key} is {shown(row.get(key))}, not {expected}"
    return None


def read_history(path: Path) -> list[dict]:
    """The rounds of history.jsonl; ValueError names the first line that is not a round's record."""
    rows, previous = [], None
    for number, line in enumerate(read_text(path, MAX_HISTORY_BYTES).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = loads(line)
        except Unreadable as e:
            raise ValueError(f"history.jsonl line {number}: {e}") from None
        except ValueError:
            raise ValueError(f"history.jsonl line {number} is not JSON (a truncated or damaged file)") from None
        if not isinstance(row, dict):
            raise ValueError(f"history.jsonl line {number} is not a round's record (round, val_acc, val_mean)")
        problem = row_problem(row, previous)
        if problem:
            raise ValueError(f"history.jsonl line {number}: {problem}")
        previous = row["round"]
        rows.append(row)
    return rows


def read_run(summary_path: Path) -> dict:
    """One run's summary (with its folder and history); ValueError says what makes it unusable."""
    try:
        s = loads(read_bytes(summary_path, MAX_SUMMARY_BYTES))
    except Unreadable as e:
        raise ValueError(f"unreadable summary.json: {e}") from None
    except ValueError as e:
        raise ValueError(f"unreadable summary.json: not JSON ({e})") from None
    problem = summary_problem(s)
    if problem:
        raise ValueError(f"malformed summary.json: {problem}")
    history = summary_path.parent / "history.jsonl"
    s["_history"] = read_history(history) if os.path.lexists(history) else None
    s["_dir"] = summary_path.parent
    s["_mtime"] = summary_path.stat().st_mtime
    return s


def last_error(run_dir: Path) -> str:
    """The message of the last error in a run's log (else its last line), without the log's prefix."""
    logs = [run_dir / "federate.log"] if (run_dir / "federate.log").exists() else sorted(run_dir.glob("*.log"))
    if not logs:
        return ""
    try:
        text = read_text(logs[0], MAX_LOG_BYTES, tail=True)
    except (OSError, ValueError) as e:
        return f"its log cannot be read ({e})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    parsed = [LOG_LINE.match(ln) for ln in lines]
    errors = [m["message"] for m in parsed if m and m["level"] in ("ERROR", "CRITICAL")]
    if errors:
        return errors[-1]
    if not lines:
        return ""
    return parsed[-1]["message"] if parsed[-1] else lines[-1]


def is_federate_job(hydra_dir: Path) -> bool | None:
    """Whether a Hydra job folder is a federate run (None: its .hydra cannot tell)."""
    hydra_yaml = hydra_dir / "hydra.yaml"
    if hydra_yaml.exists():
        try:
            return "config_name: federate" in read_text(hydra_yaml, MAX_HYDRA_BYTES)
        except (OSError, ValueError):
            return None
    try:
        config = yaml.safe_load(read_text(hydra_dir / "config.yaml", MAX_HYDRA_BYTES))
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        return None
    return isinstance(config, dict) and {"method", "target_domain"} <= set(config)


def collect(root: Path) -> Runs:
    """Every run under root: those with a usable summary, and the others with the reason."""
    runs = Runs()
    for path in sorted(root.rglob("summary.json")):
        if "report" in path.relative_to(root).parts[:-1]:
            continue
        try:
            runs.summaries.append(read_run(path))
        except (OSError, ValueError) as e:
            runs.broken.append(Broken(path.parent, str(e)))
    for hydra_dir in sorted(root.rglob(".hydra")):
        run_dir = hydra_dir.parent
        if (run_dir / "summary.json").exists() or not hydra_dir.is_dir():
            continue
        federate = is_federate_job(hydra_dir)
        if federate is False:
            continue
        why = "no summary.json (failed or unfinished)"
        if federate is None:
            why += "; its .hydra folder has neither hydra.yaml nor a readable config.yaml"
        message = last_error(run_dir)
        runs.broken.append(Broken(run_dir, why + (f": {message}" if message else "")))
    runs.sweeps = sweeps(root)
    return runs


def sweeps(root: Path) -> list[Sweep]:
    """The sweep folders under root (and root itself), with their jobs: planned (multirun.yaml), started (a
    .hydra folder) and finished (a summary.json)."""
    from .sweep_folder import MULTIRUN_YAML, planned_jobs

    out = []
    for path in sorted(root.rglob(MULTIRUN_YAML)):
        if "report" in path.relative_to(root).parts[:-1]:
            continue
        folder = path.parent
        jobs = {h.parent for h in folder.rglob(".hydra") if h.is_dir()}
        finished = sum((j / "summary.json").is_file() for j in jobs)
        out.append(Sweep(folder, finished, planned_jobs(folder), len(jobs)))
    return out
