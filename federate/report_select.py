"""A run's reported numbers, per domain and per client, and re-selected from its history.

A run may have several clients per domain (`<domain>/<k>`): the report's tables are per domain (the mean
over the domain's clients) plus the spread over clients (mean, worst, 10th percentile). Runs of a
fedclip that had one client per domain name their clients after the domain.

`reselect` recomputes a run's numbers under another selection rule (federate/selection.py) from the rows
of its history.jsonl, when every row carries every metric (val_acc, test_acc for the same clients,
target_acc, val_mean, val_rows); older histories recorded test accuracies on improving rounds only.
"""
from __future__ import annotations

import statistics

import numpy as np

from . import selection

FULL_ROW = ("val_acc", "test_acc", "target_acc", "val_mean", "val_rows")


def domain_of(s: dict, client: str) -> str:
    info = (s.get("clients") or {}).get(client)
    if isinstance(info, dict) and isinstance(info.get("domain"), str):
        return info["domain"]
    return client.rsplit("/", 1)[0] if "/" in client else client


def per_domain(s: dict, accuracies: dict[str, float]) -> dict[str, float]:
    """The mean accuracy of each domain's clients."""
    by_domain: dict[str, list[float]] = {}
    for client, acc in accuracies.items():
        by_domain.setdefault(domain_of(s, client), []).append(acc)
    return {d: statistics.fmean(v) for d, v in by_domain.items()}


def spread(accuracies: dict[str, float]) -> dict[str, float] | None:
    """Mean, worst and 10th percentile (linear interpolation) over clients."""
    if not accuracies:
        return None
    values = list(accuracies.values())
    return {"mean": statistics.fmean(values), "worst": min(values), "p10": float(np.percentile(values, 10))}


def domain_accuracies(s: dict) -> dict[str, float]:
    return s.get("personalization_domains") or per_domain(s, s["personalization"])


def client_spread(s: dict) -> dict[str, float] | None:
    return s.get("personalization_spread") or spread(s["personalization"])


def has_several_clients_per_domain(s: dict) -> bool:
    return len(s["personalization"]) > len(domain_accuracies(s))


def full_history(rows: list[dict] | None) -> bool:
    """Whether every round records every metric (so any rule can select from it)."""
    return bool(rows) and all(
        all(k in r for k in FULL_ROW) and isinstance(r["test_acc"], dict) and set(r["test_acc"]) == set(r["val_acc"])
        and (r["target_acc"] is None or isinstance(r["target_acc"], (int, float)))
        for r in rows)


def reselect(s: dict, rule: str) -> dict | None:
    """The run's summary with the numbers of the round `rule` selects, or None when its history cannot
    tell (an older history, oracle without a target domain, or a run whose reported model comes from an
    exchange after the rounds, which only the selected round had: CCVR's calibration)."""
    rows = s.get("_history")
    if not full_history(rows) or (rule == "oracle" and any(r["target_acc"] is None for r in rows)) \
            or s.get("after_rounds"):
        return None
    row = selection.select(rows, rule)
    out = dict(s)
    out.update(selection=rule, **selection.results(row, {c: domain_of(s, c) for c in row["test_acc"]}))
    return out
