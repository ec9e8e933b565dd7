"""python -m federate.report <dir>: paper-style tables (and plots) from the runs under a folder.

Searches <dir> recursively for summary.json and writes to <dir>/report/: report.md (every table, what was
picked and what was left out), per_round.csv (every run's per-round, per-client metrics), and one folder
per table set, <dataset>__<model>/ (with __cache-<id> and __splits-<id> when other caches or splits of the
same dataset and model are in the folder), with the generalization, personalization
and overall tables as CSV and, with matplotlib (pip install -e '.[plot]'), accuracy_per_round.png and
cost.png. Accuracies are in percent; cells are mean ± standard error over seeds, with the number of seeds.

- A table set holds the runs that computed on the same data: the same dataset, model, cache identity and
  cache content (checksums), and for split_file runs the same splits. Runs of older versions, which did
  not record these, are grouped by (dataset, model).
- A row is a method variant: every setting that changes results (adapter, strategy, partition,
  clients_per_round, selection, engine, split_file, the backbone's optimizer, ...) makes another row.
- Two runs of one variant with the same target, learning rate and seed are one seed: the newest is kept
  and the report names the others.
- When a sweep covers several learning rates, each (method, target) uses the learning rate with the best
  mean validation accuracy over seeds (never the test accuracy); the report says which it picked.
- `--selection RULE` re-selects each run's reported round from its history.jsonl (federate/selection.py);
  runs whose history does not record every metric every round keep their own selection.
- Runs without a usable summary (failed, unfinished or damaged) are listed with the reason.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import re
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from . import selection
from extract.files import UnsafePath, open_atomic, own_folder, write_text

from .errors import ConfigError
from .inputs import MiB, read_json
from .report_plots import TARGET_NONE, target_label, write_plots
from .report_runs import collect
from .report_select import client_spread, domain_accuracies, has_several_clients_per_domain, reselect

log = logging.getLogger("federate.report")

# The paper's FedCLIP numbers with CLIP ViT-B/32 (docs/protocol.md), keyed by the domain's initial.
PAPER_MODEL = "openai/clip-vit-base-patch32"
PAPER = {
    "generalization": {"pacs": {"A": 96.34, "C": 97.91, "P": 99.76, "S": 85.59, "Avg": 94.90},
                       "office_home": {"A": 78.00, "C": 63.69, "P": 87.52, "R": 87.79, "Avg": 79.25}},
    "overall": {"pacs": {"A": 95.04, "C": 95.06, "P": 95.43, "S": 94.99, "Avg": 95.13},
                "vlcs": {"C": 83.68, "L": 82.62, "S": 82.82, "V": 83.30, "Avg": 83.11},
                "office_home": {"Avg": 80.27}},
}
# What tells runs apart. Every setting of conf/federate.yaml is one of three kinds (reported_as; a test
# walks the composed config and fails on a setting of none):
# - a variant key: another value makes another row (method_label). The top-level keys below, with their
#   defaults (not shown in a label), and every setting of a group the run used (VARIANT_GROUPS, e.g.
#   method.mu, partition.alpha: a method's new setting needs no edit here);
# - part of the results' identity (IDENTITY): the table set (what the run computed on), the target column,
#   the learning rate (picked by validation) or the seed (the samples of a cell);
# - declared not to change what is measured (NOT_MEASURED), with the reason.
VARIANT_KEYS = ("aggregation", "loss", "text_adapter", "local_epochs", "batch_size", "precision", "rounds", "backend",
                "engine", "clients_per_round", "selection", "finetune_epochs", "split_file")
DEFAULTS = {"aggregation": "uniform", "loss": "contrastive", "text_adapter": False, "local_epochs": 1,
            "batch_size": 32, "precision": "fp32", "rounds": 200, "backend": "local", "engine": "auto",
            "clients_per_round": None, "selection": "val_mean", "finetune_epochs": 0, "split_file": None}
VARIANT_GROUPS = ("method", "adapter", "strategy", "partition", "optimizer", "backbone", "privacy")
IDENTITY = {
    "dataset.classes": "the class subset: a table set of its own (the paper's numbers are for every class)",
    "dataset.": "what the cache was built from: the table set is the cache's identity and checksums",
    "model.": "the model the cache was built with: its name and the cache's identity and checksums",
    "cache_dir": "where the cache is: the table set is the cache's identity and checksums, not its path",
    "cache_file": "where the cache is: the table set is the cache's identity and checksums, not its path",
    "target_domain": "the target: a column of the tables",
    "lr": "the learning rate: each (row, target) keeps the lr with the best mean validation accuracy",
    "seed": "the seed: the runs of a cell are its seeds",
}
NOT_MEASURED = {
    "device": "the same computation on a CPU or a GPU (to float rounding)",
    "flower.min_clients": "decides only when a Flower run stops for lack of clients; a run that lost clients is "
                          "listed under 'Runs that lost clients'",
    "flower.round_timeout": "decides only when a Flower client is dropped, which the report lists",
    "flower.startup_timeout": "decides only how long a Flower run waits for its clients to connect",
    "backbone.num_workers": "how many processes decode the images: the same images in the same order",
    "backbone.eval_batch_size": "the batch size of evaluation: the same predictions",
}
NA = "—"  # a number that does not exist (no target domain, a domain without clients), never 0


def reported_as(path: str) -> str | None:
    """How the report tells runs apart by a setting (a dotted path of conf/federate.yaml): "variant",
    "identity" or "not measured"; None for a setting it does not know (a test fails on one)."""
    if path in NOT_MEASURED:
        return "not measured"
    if path in VARIANT_KEYS or path.split(".")[0] in VARIANT_GROUPS:
        return "variant"
    if path in IDENTITY or any(k.endswith(".") and path.startswith(k) for k in IDENTITY):
        return "identity"
    return None


def settings_label(name: str, settings: dict, hidden=()) -> str:
    shown = {k: v for k, v in settings.items() if k not in hidden}
    return name + (f"({', '.join(f'{k}={v}' for k, v in shown.items())})" if shown else "")


def config_of(s: dict) -> dict:
    """The config a run recorded in its summary ({} for older runs)."""
    return s["config"] if isinstance(s.get("config"), dict) else {}


def setting(s: dict, key: str):
    """A run's setting: from its summary, else from the config it recorded (finetune_epochs, split_file)."""
    value = s.get(key, config_of(s).get(key))
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def split_file(s: dict) -> str | None:
    value = setting(s, "split_file")
    return str(value) if value else None


def group_settings(s: dict, group: str) -> dict | None:
    """The settings of a config group the run used (name included; the settings that do not change what is
    measured, and the lr, which is part of the identity, left out): the summary's record of the group when it
    is one (the adapter's, strategy's and optimizer's own account of the settings they use), else the config
    node the run recorded; None when the run did not use the group (zero-shot's adapter, a local run's
    strategy, the cached methods' optimizer and backbone, which their summaries record as null)."""
    recorded = s.get(group)
    if group != "method" and not recorded:
        return None
    node = recorded if isinstance(recorded, dict) else config_of(s).get(group)
    if not isinstance(node, dict):
        node = {"name": recorded if group != "method" else s["method"]}
    return {k: v for k, v in node.items() if f"{group}.{k}" not in NOT_MEASURED and k != "lr"}


def option_defaults(group: str, name: str) -> dict:
    """The settings of conf/<group>/<name>.yaml ({} when there is none)."""
    from omegaconf import OmegaConf

    from .cli import CONF_DIR

    path = CONF_DIR / group / f"{name}.yaml"
    if not re.fullmatch(r"[A-Za-z0-9_]+", str(name)) or not path.is_file():
        return {}
    node = OmegaConf.to_container(OmegaConf.load(path))
    if path.read_text().startswith("# @package _global_"):
        node = node.get(group, {})
    return node if isinstance(node, dict) else {}


def privacy_settings(s: dict) -> dict | None:
    """The privacy settings a run recorded in its config (name included), or None without privacy. Not the
    summary's `privacy` record, which holds what the run spent besides."""
    node = config_of(s).get("privacy")
    if not isinstance(node, dict) or node.get("name", "none") == "none":
        return None
    return dict(node)


def method_label(s: dict, privacy_hidden: tuple[str, ...] = (), no_privacy: bool = False) -> str:
    """The row name of a run: the method (with its backbone when it trains one) and every setting that
    makes a different variant (adapter, server strategy, loss, partition, privacy, ...); runs with the same
    label are seeds. `privacy_hidden`: privacy settings left out (a privacy-utility curve's points);
    `no_privacy`: the label without privacy at all."""
    extras = [f"{k}={setting(s, k)}" for k in VARIANT_KEYS
              if k != "split_file" and setting(s, k) is not None and setting(s, k) != DEFAULTS.get(k)
              and not (k == "rounds" and s.get("best_round") == 0)]  # (a method that trains nothing)
    if "selection=oracle" in extras:
        extras[extras.index("selection=oracle")] = "selection=oracle: an upper bound"
    adapter, server, partition = (group_settings(s, g) for g in ("adapter", "strategy", "partition"))
    if split_file(s):
        extras.insert(0, f"split_file={(s.get('splits_sha256') or '')[:8] or Path(split_file(s)).name}")
    if partition and partition.get("name") != "domain":
        extras.insert(0, "partition=" + settings_label(partition.get("name"), partition, hidden=("name",)))
    optimizer = group_settings(s, "optimizer") if isinstance(s.get("optimizer"), dict) else None
    if optimizer:
        extras.insert(0, "optimizer=" + settings_label(optimizer.get("name", ""), optimizer, hidden=("name",)))
    if adapter and adapter.get("name") != "attai":
        extras.insert(0, "adapter=" + settings_label(adapter.get("name"), adapter, hidden=("name",)))
    elif adapter:  # AttAI's text tower is text_adapter, listed above
        extras[:0] = [f"{k}={v}" for k, v in adapter.items() if k not in ("name", "text_tower")]
    if server and server.get("name") != "fedavg":
        extras.insert(0, "strategy=" + settings_label(server.get("name"), server, hidden=("name", "aggregation")))
    extras[:0] = [f"{k}={v}" for k, v in group_settings(s, "method").items() if k != "name"]  # mu, any method's
    dp = None if no_privacy else privacy_settings(s)
    if dp:
        shown = {k: v for k, v in dp.items() if v is not None}  # (noise_multiplier or epsilon may be unset)
        extras.append("privacy=" + settings_label(dp["name"], shown, hidden=("name", *privacy_hidden)))
    return s["method"] + backbone_label(s) + (f" ({', '.join(extras)})" if extras else "")


def spent_epsilon(s: dict) -> float | None:
    """The epsilon a private run spent (its summary's, checked: a finite number >= 0), else None."""
    value = s.get("epsilon")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


CURVE_KEYS = ("noise_multiplier", "epsilon")  # what a privacy-utility sweep varies


def privacy_curves(runs: list[dict]) -> tuple[dict, dict]:
    """Privacy against utility: {curve: ([(epsilon, overall %, seeds)], the label without privacy)}, one point
    per row of the tables whose privacy settings differ only in noise_multiplier or epsilon (means over its
    runs), sorted by epsilon; and {label: overall %} of the non-private rows, drawn beside the curve of the
    same label without privacy. Private runs whose epsilon is infinite (noise 0) are left out."""
    points, baselines, bases = defaultdict(lambda: defaultdict(list)), defaultdict(list), {}
    for s in runs:
        overall = s.get("overall")
        if not isinstance(overall, (int, float)) or not math.isfinite(overall):
            continue
        if privacy_settings(s) is None:
            baselines[method_label(s)].append(100 * overall)
        elif spent_epsilon(s) is not None:
            points[method_label(s, CURVE_KEYS)][method_label(s)].append((spent_epsilon(s), 100 * overall))
            bases[method_label(s, CURVE_KEYS)] = method_label(s, no_privacy=True)
    curves = {}
    for curve, rows in points.items():
        curves[curve] = (sorted((statistics.fmean(e for e, _ in v), statistics.fmean(a for _, a in v), len(v))
                                for v in rows.values()), bases[curve])
    return curves, {k: statistics.fmean(v) for k, v in baselines.items()}


def privacy_table(runs: list[dict]) -> tuple[list[str], list[list], int] | None:
    """The privacy-utility table: each private row's epsilon (the worst client's for DP-SGD), delta and
    overall accuracy, ordered by epsilon within its curve; None without private runs."""
    curves, _ = privacy_curves(runs)
    if not curves:
        return None
    by_label = defaultdict(list)
    for s in runs:
        if spent_epsilon(s) is not None:
            by_label[method_label(s)].append(s)
    rows = []
    for curve in sorted(curves):
        for label in sorted((k for k in by_label if method_label(by_label[k][0], CURVE_KEYS) == curve),
                            key=lambda k: statistics.fmean(spent_epsilon(s) for s in by_label[k])):
            group = by_label[label]
            delta = group[-1].get("delta")  # (the runs of a label share their settings, delta among them)
            rows.append([label, f"{statistics.fmean(spent_epsilon(s) for s in group):.3g}",
                         f"{delta:g}" if isinstance(delta, (int, float)) and not isinstance(delta, bool) else NA,
                         cell([s["overall"] for s in group])])
    return ["method", "epsilon", "delta", "overall"], rows, 3


def backbone_label(s: dict) -> str:
    """"/<backbone>" for a run that trained one, with the settings that differ from its option's defaults."""
    backbone = s.get("backbone")
    if not backbone:
        return ""
    if isinstance(backbone, dict) and not config_of(s).get("backbone"):  # (an older run's record)
        return "/" + settings_label(backbone.get("name", "?"), backbone, hidden=("name",))
    node = group_settings(s, "backbone")
    name = str(backbone.get("name", "?") if isinstance(backbone, dict) else backbone)
    defaults = option_defaults("backbone", name)
    changed = {k: v for k, v in node.items() if k != "name" and defaults.get(k, object()) != v}
    return "/" + settings_label(name, changed)


def slug(name: str) -> str:
    """A file name from a name found in a cache or a summary: no path separators, no leading dots."""
    text = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name).replace("/", "--").replace("\\", "--"))
    text = re.sub(r"\.{2,}", ".", text).strip(".-")[:80].strip(".-")
    return text or "unnamed"


@dataclass
class TableSet:
    """Runs that computed on the same data: one set of tables and one folder."""
    dataset: str
    model: str
    identity: str | None  # the cache's identity_sha256 (None: an older run did not record it)
    splits: str | None  # sha256 of the splits.json of split_file runs
    classes: tuple | None = None  # the class subset (dataset.classes); None: every class of the cache
    inputs: str | None = None  # the images the cache was built from (its inputs_fingerprint) ...
    model_fingerprint: str | None = None  # ... and the model (runs on those images go beside: the baselines)
    checksums: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)
    folder: str = ""
    other_content_than: str = ""  # the folder of a table set with the same names but other embeddings

    def agrees(self, s: dict) -> bool:
        if on_images(s):  # a backbone baseline: beside the runs on a cache of the same images and model
            return (self.identity is not None and self.inputs == s["inputs_fingerprint"] and self.splits is None
                    and self.classes is None and s.get("model_fingerprint") in (None, self.model_fingerprint)
                    and self.dataset == s["dataset"])
        same = (self.dataset, self.model, self.identity, self.splits, self.classes) == data_key(s)
        sums = s.get("cache_checksums") or {}
        return same and all(self.checksums.get(k, v) == v for k, v in sums.items())

    def heading(self) -> str:
        what = [f"cache {self.identity[:12]}" if self.identity else "cache identity not recorded: older runs"]
        if self.splits:
            what.append(f"splits {self.splits[:12]}")
        if self.classes is not None:
            what.append(f"classes {', '.join(self.classes)} ({len(self.classes)} classes)")
        if self.other_content_than:
            what.append(f"other embeddings than {self.other_content_than}: the cache was rebuilt")
        return f"{self.dataset} with {self.model} ({', '.join(what)})"


def on_images(s: dict) -> bool:
    """A run that trained on the images (a backbone baseline), which names them instead of a cache."""
    return s.get("cache_identity_sha256") is None and isinstance(s.get("inputs_fingerprint"), str)


def data_key(s: dict) -> tuple:
    return (s["dataset"], s.get("model", "?"), s.get("cache_identity_sha256") or None,
            (s.get("splits_sha256") or None) if split_file(s) else None, class_subset(s))


def class_subset(s: dict) -> tuple[str, ...] | None:
    """The classes a run was restricted to (dataset.classes), or None: every class of its cache."""
    classes = (config_of(s).get("dataset") or {}).get("classes") if isinstance(config_of(s).get("dataset"), dict) \
        else None
    return None if classes is None else tuple(str(c) for c in (classes if isinstance(classes, list) else [classes]))


def table_sets(runs: list[dict]) -> list[TableSet]:
    """Group runs by what they computed on; each set gets a folder name of its own."""
    sets: list[TableSet] = []
    for s in sorted(runs, key=lambda s: (on_images(s), str(s["_dir"]))):  # the caches' sets first
        match = next((t for t in sets if t.agrees(s)), None)
        if match is None:
            match = TableSet(*data_key(s), inputs=s.get("cache_inputs_fingerprint") or s.get("inputs_fingerprint"),
                             model_fingerprint=s.get("cache_model_fingerprint") or s.get("model_fingerprint"))
            sets.append(match)
        match.checksums.update(s.get("cache_checksums") or {})
        match.runs.append(s)
    sets.sort(key=lambda t: (t.dataset, t.model, t.identity or "", t.splits or "", t.classes or ()))
    used = {}
    plain = Counter(f"{slug(t.dataset)}__{slug(t.model)}".lower() for t in sets)
    for t in sets:
        name = f"{slug(t.dataset)}__{slug(t.model)}"
        if plain[name.lower()] > 1:  # other caches or splits of the same (dataset, model): say which
            name = "__".join([name, *([f"cache-{t.identity[:8]}"] if t.identity else []),
                              *([f"splits-{t.splits[:8]}"] if t.splits else []),
                              *([f"classes-{classes_id(t.classes)}"] if t.classes is not None else [])])
        folder, n = name, 1
        while folder.lower() in used:  # the same names, other content (a cache rebuilt at the same path)
            n += 1
            folder = f"{name}-{n}"
        if n > 1:
            t.other_content_than = used[name.lower()]
        used[folder.lower()] = folder
        t.folder = folder
    return sets


def classes_id(classes: tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps(list(classes)).encode()).hexdigest()[:8]


def drop_repeats(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """One run per (variant, target, lr, seed): the newest. A repeated seed is not another sample."""
    by_key = defaultdict(list)
    for s in runs:
        by_key[(method_label(s), target_label(s["target_domain"]), s["lr"], s["seed"])].append(s)
    kept, notes = [], []
    for (method, target, lr, seed), rs in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        rs.sort(key=lambda s: (s["_mtime"], str(s["_dir"])))
        kept.append(rs[-1])
        if len(rs) > 1:
            notes.append(f"{method}, target {target}, lr {lr:g}, seed {seed}: kept {rs[-1]['_dir']} (the newest); "
                         f"left out {', '.join(str(r['_dir']) for r in rs[:-1])}")
    return kept, notes


def select_lr(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """Keep, per (method variant, target), the runs of the learning rate with the best mean validation
    accuracy over seeds; say what was picked when there was a choice."""
    by_cell = defaultdict(lambda: defaultdict(list))
    for s in runs:
        by_cell[(method_label(s), target_label(s["target_domain"]))][s["lr"]].append(s)
    kept, notes = [], []
    for (method, target), by_lr in sorted(by_cell.items()):
        best_lr = max(by_lr, key=lambda lr: (statistics.fmean(r["val_mean"] for r in by_lr[lr]), -lr))
        kept += by_lr[best_lr]
        if len(by_lr) > 1:
            vals = ", ".join(f"{lr:g}: {100 * statistics.fmean(r['val_mean'] for r in rs):.2f}%"
                             for lr, rs in sorted(by_lr.items()))
            notes.append(f"{method}, target {target}: lr {best_lr:g} (mean validation accuracy by lr: {vals})")
    return kept, notes


def cell(values: list[float | None]) -> dict | None:
    """Mean and standard error (sample std / sqrt n) in percent, over the runs that have the number."""
    pct = [100 * v for v in values if v is not None]
    if not pct:
        return None
    se = statistics.stdev(pct) / math.sqrt(len(pct)) if len(pct) > 1 else None
    return {"mean": statistics.fmean(pct), "se": se, "n": len(pct)}


def fmt(c: dict | float | None) -> str:
    if c is None:
        return NA
    if isinstance(c, (int, float)):
        return f"{c:.2f}"
    return f"{c['mean']:.2f} ± {c['se']:.2f} ({c['n']})" if c["se"] is not None else f"{c['mean']:.2f} ({c['n']})"


def paper_value(table: str, dataset: str, model: str, domain: str, targets=()):
    """The paper's number for a target domain, or its average when `targets` covers all its domains."""
    if model != PAPER_MODEL or dataset not in PAPER[table] or domain == TARGET_NONE:
        return None
    numbers = PAPER[table][dataset]
    if domain == "Avg":
        covered = {t[:1].upper() for t in targets} >= set(numbers) - {"Avg"} and len(targets) >= 4
        return numbers["Avg"] if covered else None
    return numbers.get(domain[:1].upper())


SPREAD = (("clients mean", "mean"), ("clients worst", "worst"), ("clients p10", "p10"))


def tables(runs: list[dict], dataset: str, model: str, subset: bool = False) -> dict[str, tuple[list[str], list[list], int]]:
    """name -> (header, rows of cells or strings, number of label columns); the paper's numbers beside them
    unless the runs are on a class `subset`."""
    if subset:
        model = ""  # the paper's numbers are for every class
    methods_ = sorted({method_label(s) for s in runs})
    targets = sorted({target_label(s["target_domain"]) for s in runs}, key=lambda t: (t == TARGET_NONE, t))
    domains = sorted({d for s in runs for d in domain_accuracies(s)} | (set(targets) - {TARGET_NONE}))
    with_spread = any(has_several_clients_per_domain(s) for s in runs)
    groups = defaultdict(list)
    for s in runs:
        groups[(method_label(s), target_label(s["target_domain"]))].append(s)

    def metric(method, target, get):
        rs = groups.get((method, target))
        return cell([get(r) for r in rs]) if rs else None

    def avg(cells):
        cells = [c for c in cells if c is not None]
        return statistics.fmean(c["mean"] for c in cells) if cells and len(cells) == len(targets) else None

    def sent(method, target=None):  # MB up and down in the whole run, the mean over its runs
        rs = [r for (m, t), group in groups.items() if m == method and target in (None, t) for r in group]
        mb = [megabytes_sent(r) for r in rs]
        return statistics.fmean(mb) if rs and None not in mb else None

    out = {}
    header = ["method", *targets, "Avg", SENT]
    rows = []
    for m in methods_:
        cells = [metric(m, t, lambda r: r["generalization"]) for t in targets]
        rows.append([m, *cells, avg(cells), sent(m)])
    if any(paper_value("generalization", dataset, model, t) for t in targets):
        rows.append(["FedCLIP (paper)", *[paper_value("generalization", dataset, model, t) for t in targets],
                     paper_value("generalization", dataset, model, "Avg", targets), None])
    out["generalization"] = (header, rows, 1)

    spread_header = [name for name, _ in SPREAD] if with_spread else []
    header = ["method", "target", *domains, "Avg", *spread_header, SENT]
    rows = []
    for m in methods_:
        for t in targets:
            if (m, t) not in groups:
                continue
            per = [None if d == t else metric(m, t, lambda r, d=d: domain_accuracies(r).get(d)) for d in domains]
            spread = [metric(m, t, lambda r, k=k: (client_spread(r) or {}).get(k)) for _, k in SPREAD]
            rows.append([m, t, *per, metric(m, t, lambda r: r["personalization_mean"]),
                         *(spread if with_spread else []), sent(m, t)])
    out["personalization"] = (header, rows, 2)

    paper = [paper_value("overall", dataset, model, t, targets) for t in [*targets, "Avg"]]
    header = ["target", *methods_, *(["FedCLIP (paper)"] if any(p is not None for p in paper) else [])]
    columns = {m: [metric(m, t, lambda r: r["overall"]) for t in targets] for m in methods_}
    rows = [[t, *[columns[m][i] for m in methods_]] for i, t in enumerate(targets)]
    rows.append(["Avg", *[avg(columns[m]) for m in methods_]])
    if len(header) > 1 + len(methods_):
        for row, p in zip(rows, paper):
            row.append(p)
    rows.append([SENT, *[sent(m) for m in methods_], *([None] if len(header) > 1 + len(methods_) else [])])
    out["overall"] = (header, rows, 1)
    return out


SENT = "total MB sent per run"  # the tables' cost column (a row of the overall table, whose columns are methods)


def megabytes_sent(s: dict) -> float | None:
    """What a run sent, up and down, in MB (10^6 bytes): summary.json's bytes_total (the rounds, and the
    method's exchange after them); None for runs that did not record it."""
    total = s.get("bytes_total")
    if not isinstance(total, dict) or not all(isinstance(total.get(k), (int, float)) for k in ("up", "down")):
        return None
    return (total["up"] + total["down"]) / 1e6


def md_text(v: str) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown(header, rows, label_cols: int) -> str:
    lines = ["| " + " | ".join(md_text(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_text(v) if i < label_cols else fmt(v) for i, v in enumerate(row)) + " |"
              for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, header, rows, label_cols: int) -> None:
    """Cells become three columns each: <name>, <name>_se, <name>_n; a number that does not exist is empty."""
    with open_atomic(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*header[:label_cols], *[f"{h}{s}" for h in header[label_cols:] for s in ("", "_se", "_n")]])
        for row in rows:
            out = list(row[:label_cols])
            for v in row[label_cols:]:
                if isinstance(v, dict):
                    out += [f"{v['mean']:.4f}", "" if v["se"] is None else f"{v['se']:.4f}", v["n"]]
                else:
                    out += ["" if v is None else f"{v:.4f}", "", ""]
            w.writerow(out)


PER_ROUND_HEADER = ["run", "dataset", "model", "method", "target_domain", "seed", "lr", "round", "client", "role",
                    "train_loss", "val_acc", "test_acc", "sampled"]


def per_round_rows(runs: list[dict]):
    for s in runs:
        base = [str(s["_dir"]), s["dataset"], s.get("model", ""), method_label(s), target_label(s["target_domain"]),
                s["seed"], s["lr"]]
        for r in s["_history"] or []:
            sampled = r.get("sampled")
            losses = r.get("train_loss") if isinstance(r.get("train_loss"), dict) else {}
            tests = r.get("test_acc") if isinstance(r.get("test_acc"), dict) else {}
            for client, val in r["val_acc"].items():
                yield [*base, r["round"], client, "participant", losses.get(client, ""), val, tests.get(client, ""),
                       "" if not isinstance(sampled, list) else client in sampled]
            if r.get("target_acc") is not None:
                yield [*base, r["round"], s["target_domain"], "target", "", "", r["target_acc"], ""]


def report_folder(root: Path) -> Path:
    """<root>/report: a folder this tool made (it holds report.md) or a new one; never someone else's, never
    a link (UnsafePath)."""
    out = root / "report"
    if out.is_symlink():
        own_folder(out)
    if out.is_dir() and any(out.iterdir()) and not os.path.lexists(out / "report.md"):
        raise ConfigError(f"{out} exists and holds files that are not a report (no report.md); "
                          "move them away so that the report does not overwrite them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder; move it away so that the report can be written there")
    return own_folder(out)


def inside(folder: Path, name: str) -> Path:
    """The folder <folder>/<name> (created), refused when it would lie elsewhere or is a link (UnsafePath)."""
    path = folder / name
    if path.parent != folder or name in ("", ".", ".."):
        raise ConfigError(f"refusing to write {path}: outside {folder}")  # slug() never makes such a name
    return own_folder(path)


def apply_selection(runs: list[dict], rule: str | None) -> tuple[list[dict], list[str]]:
    """Re-select each run's round under `rule` from its history; the runs whose history cannot tell
    keep their own selection."""
    if rule is None:
        return runs, []
    out, kept_own = [], []
    for s in runs:
        again = reselect(s, rule)
        out.append(again if again is not None else s)
        if again is None:
            kept_own.append(str(s["_dir"]))
    notes = [f"Selection: every run's reported round re-selected by {selection.LABELS[rule]} from its "
             f"history.jsonl ({len(runs) - len(kept_own)} of {len(runs)} runs)."]
    if kept_own:
        notes.append(f"{len(kept_own)} runs keep their own selection: their history does not record every "
                     "metric every round (older runs)" + (" or they have no target domain" if rule == "oracle" else "")
                     + ", or their method changed the selected round's model after the rounds (ccvr)"
                     + ": " + ", ".join(kept_own))
    return out, notes


def report(root: Path, make_plots: bool = True, cost_bench: dict | None = None, rule: str | None = None) -> str:
    found = collect(root)
    out_dir = report_folder(root)
    runs, selection_notes = apply_selection(found.summaries, rule)
    text = [f"# Report for {root}", "", f"{len(runs)} runs with a summary.",
            *([""] + [f"- {s.line()}" for s in found.sweeps] if found.sweeps else []),
            *([""] if selection_notes else []), *selection_notes]
    for t in table_sets(runs):
        folder = inside(out_dir, t.folder)
        unique, repeats = drop_repeats(t.runs)
        kept, notes = select_lr(unique)
        text += ["", f"## {t.heading()}", "", f"Files: {folder}/", "",
                 "Accuracy in percent: mean ± standard error over seeds (number of seeds); "
                 f"{NA}: no such number (no target domain). {SENT}: megabytes (10^6 bytes) the clients sent and "
                 "received in a whole run, up + down (summary.json bytes_total), the mean over its runs."]
        if repeats:
            text += ["", "Runs repeated with the same settings and seed count once (the newest):"]
            text += [f"- {n}" for n in repeats]
        if notes:
            text += ["", "Learning rate picked by the best mean validation accuracy:"] + [f"- {n}" for n in notes]
        for name, (header, rows, label_cols) in tables(kept, t.dataset, t.model, t.classes is not None).items():
            text += ["", f"### {name.capitalize()}", "", markdown(header, rows, label_cols)]
            write_csv(folder / f"{name}.csv", header, rows, label_cols)
        private = privacy_table(kept)
        if private:
            text += ["", "### Privacy and utility", "",
                     "epsilon: what the run spent at delta (DP-SGD: the worst client's; docs/privacy.md).", "",
                     markdown(*private)]
            write_csv(folder / "privacy.csv", *private)
        if make_plots:
            for p in write_plots(kept, folder, f"{t.dataset} / {t.model}", method_label, cost_bench,
                                 privacy_curves(kept)):
                text.append(f"\nplot: {p}")
    with open_atomic(out_dir / "per_round.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PER_ROUND_HEADER)
        w.writerows(per_round_rows(runs))
    caveats = [f"- {s['_dir']}: " + "; ".join(
        ([f"stopped early: {s['stopped']}"] if s.get("stopped") else [])
        + ([f"dropped clients: {json.dumps(s['dropped_clients'])}"] if s.get("dropped_clients") else []))
        for s in runs if s.get("stopped") or s.get("dropped_clients")]
    if caveats:
        text += ["", "## Runs that lost clients (counted in the tables)", "", *caveats]
    if found.broken:
        text += ["", "## Runs without results", ""] + [f"- {b.folder}: {b.why}" for b in found.broken]
    write_text(out_dir / "report.md", "\n".join(text) + "\n")
    return "\n".join(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m federate.report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="a multirun folder, or outputs/ (searched recursively)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--cost", help="JSON written by bench/cost_vs_full_finetune.py --json (full-CLIP seconds)")
    parser.add_argument("--selection", choices=selection.RULES,
                        help="re-select every run's reported round from its history.jsonl by this rule "
                             "(default: each run's own selection); oracle is an upper bound, not a result")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        print(f"error: {root} is not a folder", file=sys.stderr)
        return 2
    try:
        cost_bench = read_json(args.cost, 16 * MiB) if args.cost else None
        if cost_bench is not None and not isinstance(cost_bench, dict):
            raise ValueError("it holds no JSON object")
    except (OSError, ValueError) as e:
        print(f"error: cannot read --cost {args.cost}: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(report(root, make_plots=not args.no_plots, cost_bench=cost_bench, rule=args.selection))
    except (ConfigError, UnsafePath) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nwrote {root / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
