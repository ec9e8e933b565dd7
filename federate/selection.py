"""Model selection, after the fact: which round of a run is reported (`selection=`).

Every round's record in history.jsonl holds every client's validation and test accuracy and the target
accuracy (DomainBed's habit: record everything, select afterwards). A rule scores each round; the
selected round is the first with the highest score, so a run can keep the selected adapter as it goes
(`score(row) > best`) and the report can re-select from the histories without re-running.

- `val_mean` (default, the reference code's rule): the unweighted mean of the clients' validation accuracies;
- `val_rows`: the accuracy over all validation rows pooled (clients weighted by their validation size);
- `last`: the last round;
- `oracle`: the target domain's accuracy. An upper bound that peeks at the test domain: label it as such.

A history row: {"round": r, "sampled": [clients that trained], "train_loss": {client: loss},
"val_acc": {client: acc}, "test_acc": {client: acc}, "target_acc": acc or null (no target domain),
"val_mean": float, "val_rows": float}.
"""
from __future__ import annotations

import math
import statistics

import numpy as np

from .errors import ConfigError

RULES = ("val_mean", "val_rows", "last", "oracle")
LABELS = {"val_mean": "training-domain validation (mean over clients)",
          "val_rows": "training-domain validation (pooled rows)", "last": "last round",
          "oracle": "oracle (target accuracy: an upper bound, not a result)"}


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ConfigError(f"selection must be one of {', '.join(RULES)}, not {rule!r}")
    return rule


def val_rows(val_acc: dict[str, float], val_sizes: dict[str, int]) -> float:
    """Accuracy over the pooled validation rows of the clients in `val_acc`."""
    n = sum(val_sizes[c] for c in val_acc)
    return sum(a * val_sizes[c] for c, a in val_acc.items()) / n if n else math.nan


def score(row: dict, rule: str) -> float:
    """The rule's score of one round's record (higher is better)."""
    if rule == "last":
        return float(row["round"])
    if rule == "oracle":
        if row.get("target_acc") is None:
            raise ConfigError("selection=oracle selects by the target domain's accuracy, and this run has no "
                              "target domain; use selection=val_mean")
        return float(row["target_acc"])
    return float(row[check_rule(rule)])


def select(rows: list[dict], rule: str) -> dict:
    """The selected round's record: the first with the highest score."""
    if not rows:
        raise ConfigError("no round was recorded, so there is nothing to select")
    best, best_score = None, -math.inf
    for row in rows:
        s = score(row, rule)
        if s > best_score:
            best, best_score = row, s
    if best is None:
        raise ConfigError(f"no round of the history has a finite {rule} score")
    return best


def results(row: dict, domain_of: dict[str, str]) -> dict:
    """A round's reported numbers, the one rule the run's summary.json and the report's re-selection share:
    each client's test accuracy (`personalization`), their mean and spread, the mean of each domain's
    clients, the target accuracy (`generalization`), and `overall`, the mean of the target accuracy and
    the per-domain means (with one client per domain, the paper's)."""
    test, target = dict(row.get("test_acc", {})), row.get("target_acc")
    by_domain: dict[str, list[float]] = {}
    for client, acc in test.items():
        by_domain.setdefault(domain_of.get(client, client), []).append(acc)
    per_domain = {d: statistics.fmean(v) for d, v in by_domain.items()}
    values = list(test.values())
    return {
        "best_round": row["round"], "val_mean": row["val_mean"], "val_acc": row["val_acc"],
        "generalization": target, "personalization": test,
        "personalization_mean": statistics.fmean(values) if values else math.nan,
        "personalization_domains": per_domain,
        "personalization_spread": {"mean": statistics.fmean(values), "worst": min(values),
                                   "p10": float(np.percentile(values, 10))} if values else None,
        "overall": statistics.fmean(([target] if target is not None else []) + list(per_domain.values())),
    }
