"""python -m federate.report <dir>: paper-style tables (and plots) from the runs under a folder.

Searches <dir> recursively for summary.json, groups runs by (dataset, model), and writes to <dir>/report/:
generalization, personalization and overall tables (Markdown and CSV; accuracies in percent, cells
mean ± standard error over seeds, with the number of seeds), per_round.csv (every run's per-round,
per-client metrics), and with matplotlib installed (pip install -e '.[plot]') accuracy-per-round and cost
plots. When a sweep covers several learning rates, each (method, target) uses the learning rate with the
best mean validation accuracy over seeds (never the test accuracy); the report says which it picked.
Runs without a summary (failed or unfinished) are listed, not dropped.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from . import methods

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
# Options that make a different method variant (a separate row), beside the method's name.
VARIANT_KEYS = ("aggregation", "loss", "text_adapter", "local_epochs", "batch_size", "precision", "rounds", "backend",
                "mu")
DEFAULTS = {"aggregation": "uniform", "loss": "contrastive", "text_adapter": False, "local_epochs": 1,
            "batch_size": 32, "precision": "fp32", "rounds": 200, "backend": "local"}


def settings_label(name: str, settings: dict, hidden=()) -> str:
    shown = {k: v for k, v in settings.items() if k not in hidden}
    return name + (f"({', '.join(f'{k}={v}' for k, v in shown.items())})" if shown else "")


def method_label(s: dict) -> str:
    """The row name of a run: the method (with its backbone when it trains one) and every setting that
    makes a different variant (adapter, server strategy, loss, ...); runs with the same label are seeds."""
    extras = [f"{k}={s[k]}" for k in VARIANT_KEYS
              if k in s and k != "mu" and s[k] != DEFAULTS.get(k) and not (k == "rounds" and s["method"] == "zeroshot")]
    adapter, server = s.get("adapter"), s.get("strategy")
    if adapter and adapter["name"] != "attai":  # AttAI's only setting is text_adapter, listed above
        extras.insert(0, "adapter=" + settings_label(adapter["name"], adapter, hidden=("name",)))
    if server and server["name"] != "fedavg":
        extras.insert(0, "strategy=" + settings_label(server["name"], server, hidden=("name", "aggregation")))
    if methods.METHODS.get(s["method"], methods.METHODS["fedclip"]).proximal:
        extras.insert(0, f"mu={s.get('mu')}")
    name = s["method"] + (f"/{s['backbone']}" if s.get("backbone") else "")
    return name + (f" ({', '.join(extras)})" if extras else "")


def collect(root: Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Summaries under root (each with its run dir) and the run dirs that have none."""
    runs, broken = [], []
    for path in sorted(root.rglob("summary.json")):
        if "report" in path.relative_to(root).parts[:-1]:
            continue
        try:
            s = json.loads(path.read_text())
            missing = {"method", "dataset", "target_domain", "seed", "lr", "val_mean", "generalization",
                       "personalization", "overall"} - set(s)
            if missing:
                raise ValueError(f"lacks {', '.join(sorted(missing))}")
        except ValueError as e:
            broken.append((path.parent, f"unreadable summary.json ({e})"))
            continue
        s["_dir"] = path.parent
        runs.append(s)
    for hydra_dir in sorted(root.rglob(".hydra")):
        run_dir = hydra_dir.parent
        if (hydra_dir / "config.yaml").exists() and not (run_dir / "summary.json").exists() \
                and "config_name: federate" in (hydra_dir / "hydra.yaml").read_text(errors="ignore"):
            logs = sorted(run_dir.glob("*.log"))
            last = next((ln for ln in reversed(logs[0].read_text(errors="ignore").splitlines()) if ln.strip()), "") \
                if logs else ""
            broken.append((run_dir, "no summary.json (failed or unfinished)" + (f": {last[-160:]}" if last else "")))
    return runs, broken


def select_lr(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """Keep, per (method variant, target), the runs of the learning rate with the best mean validation
    accuracy over seeds; say what was picked when there was a choice."""
    by_cell = defaultdict(lambda: defaultdict(list))
    for s in runs:
        by_cell[(method_label(s), s["target_domain"])][s["lr"]].append(s)
    kept, notes = [], []
    for (method, target), by_lr in sorted(by_cell.items()):
        best_lr = max(by_lr, key=lambda lr: (statistics.fmean(r["val_mean"] for r in by_lr[lr]), -lr))
        kept += by_lr[best_lr]
        if len(by_lr) > 1:
            vals = ", ".join(f"{lr:g}: {100 * statistics.fmean(r['val_mean'] for r in rs):.2f}%"
                             for lr, rs in sorted(by_lr.items()))
            notes.append(f"{method}, target {target}: lr {best_lr:g} (mean validation accuracy by lr: {vals})")
    return kept, notes


def cell(values: list[float]) -> dict:
    """Mean and standard error (sample std / sqrt n) in percent."""
    pct = [100 * v for v in values]
    se = statistics.stdev(pct) / math.sqrt(len(pct)) if len(pct) > 1 else None
    return {"mean": statistics.fmean(pct), "se": se, "n": len(pct)}


def fmt(c: dict | float | None) -> str:
    if c is None:
        return "-"
    if isinstance(c, (int, float)):
        return f"{c:.2f}"
    return f"{c['mean']:.2f} ± {c['se']:.2f} ({c['n']})" if c["se"] is not None else f"{c['mean']:.2f} ({c['n']})"


def paper_value(table: str, dataset: str, model: str, domain: str, targets=()):
    """The paper's number for a target domain, or its average when `targets` covers all its domains."""
    if model != PAPER_MODEL or dataset not in PAPER[table]:
        return None
    numbers = PAPER[table][dataset]
    if domain == "Avg":
        covered = {t[:1].upper() for t in targets} >= set(numbers) - {"Avg"} and len(targets) >= 4
        return numbers["Avg"] if covered else None
    return numbers.get(domain[:1].upper())


def tables(runs: list[dict], dataset: str, model: str) -> dict[str, tuple[list[str], list[list]]]:
    """name -> (header, rows of cells or strings)."""
    methods = sorted({method_label(s) for s in runs})
    targets = sorted({s["target_domain"] for s in runs})
    domains = sorted({d for s in runs for d in (s["target_domain"], *s["personalization"])})
    groups = defaultdict(list)
    for s in runs:
        groups[(method_label(s), s["target_domain"])].append(s)

    def metric(method, target, get):
        rs = groups.get((method, target))
        return cell([get(r) for r in rs]) if rs else None

    def avg(cells):
        cells = [c for c in cells if c is not None]
        return statistics.fmean(c["mean"] for c in cells) if len(cells) == len(targets) else None

    out = {}
    header = ["method", *targets, "Avg"]
    rows = []
    for m in methods:
        cells = [metric(m, t, lambda r: r["generalization"]) for t in targets]
        rows.append([m, *cells, avg(cells)])
    if any(paper_value("generalization", dataset, model, t) for t in targets):
        rows.append(["FedCLIP (paper)", *[paper_value("generalization", dataset, model, t) for t in targets],
                     paper_value("generalization", dataset, model, "Avg", targets)])
    out["generalization"] = (header, rows)

    header = ["method", "target", *domains, "Avg"]
    rows = []
    for m in methods:
        for t in targets:
            if (m, t) not in groups:
                continue
            per = [None if d == t else metric(m, t, lambda r, d=d: r["personalization"].get(d, math.nan))
                   for d in domains]
            rows.append([m, t, *per, metric(m, t, lambda r: r["personalization_mean"])])
    out["personalization"] = (header, rows)

    paper = [paper_value("overall", dataset, model, t, targets) for t in [*targets, "Avg"]]
    header = ["target", *methods, *(["FedCLIP (paper)"] if any(p is not None for p in paper) else [])]
    columns = {m: [metric(m, t, lambda r: r["overall"]) for t in targets] for m in methods}
    rows = [[t, *[columns[m][i] for m in methods]] for i, t in enumerate(targets)]
    rows.append(["Avg", *[avg(columns[m]) for m in methods]])
    if len(header) > 1 + len(methods):
        for row, p in zip(rows, paper):
            row.append(p)
    out["overall"] = (header, rows)
    return out


def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(v if isinstance(v, str) else fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, header, rows) -> None:
    """Cells become three columns each: <name>, <name>_se, <name>_n."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        label_cols = sum(1 for v in rows[0] if isinstance(v, str)) if rows else 1
        w.writerow([*header[:label_cols], *[f"{h}{s}" for h in header[label_cols:] for s in ("", "_se", "_n")]])
        for row in rows:
            out = list(row[:label_cols])
            for v in row[label_cols:]:
                if isinstance(v, dict):
                    out += [f"{v['mean']:.4f}", "" if v["se"] is None else f"{v['se']:.4f}", v["n"]]
                else:
                    out += ["" if v is None else f"{v:.4f}", "", ""]
            w.writerow(out)


def per_round_rows(runs: list[dict]):
    for s in runs:
        history = s["_dir"] / "history.jsonl"
        if not history.exists():
            continue
        base = [str(s["_dir"]), s["dataset"], s.get("model", ""), method_label(s), s["target_domain"], s["seed"], s["lr"]]
        for line in history.read_text().splitlines():
            r = json.loads(line)
            for client, val in r.get("val_acc", {}).items():
                yield [*base, r["round"], client, "participant", r.get("train_loss", {}).get(client, ""), val,
                       r.get("test_acc", {}).get(client, "")]
            if "target_acc" in r:
                yield [*base, r["round"], s["target_domain"], "target", "", "", r["target_acc"]]


PER_ROUND_HEADER = ["run", "dataset", "model", "method", "target_domain", "seed", "lr", "round", "client", "role",
                    "train_loss", "val_acc", "test_acc"]


def plots(runs: list[dict], folder: Path, title: str, cost_bench: dict | None = None) -> list[Path]:
    """Validation and target accuracy per round for each method, and FedCLIP's cost against full-CLIP FedAvg."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e '.[plot]'): no plots")
        return []
    targets = sorted({s["target_domain"] for s in runs})
    fig, axes = plt.subplots(1, len(targets), figsize=(4.5 * len(targets), 3.6), squeeze=False, sharey=True)
    for ax, target in zip(axes[0], targets):
        by_method = defaultdict(list)
        for s in runs:
            if s["target_domain"] == target and (s["_dir"] / "history.jsonl").exists():
                by_method[method_label(s)].append([json.loads(x) for x in (s["_dir"] / "history.jsonl").read_text().splitlines()])
        for i, (method, histories) in enumerate(sorted(by_method.items())):
            color = f"C{i}"
            rounds = [r["round"] for r in histories[0]]
            val = [100 * statistics.fmean(h[k]["val_mean"] for h in histories if k < len(h)) for k in range(len(rounds))]
            ax.plot(rounds, val, color=color, label=f"{method} val")
            filled = []  # each seed's target accuracy, carried forward from the rounds that recorded one
            for h in histories:
                last, row = math.nan, []
                for r in h:
                    last = 100 * r["target_acc"] if "target_acc" in r else last
                    row.append(last)
                filled.append(row)
            target_curve = [statistics.fmean(row[k] for row in filled if k < len(row)) for k in range(len(rounds))]
            ax.plot(rounds, target_curve, color=color, linestyle="--", drawstyle="steps-post", label=f"{method} target")
        ax.set(title=f"target {target}", xlabel="round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    paths = [folder / "accuracy_per_round.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    trained = [s for s in runs if s.get("trainable_params")]
    fed = next((s for s in trained if s["method"] in ("fedclip", "fedprox") and s.get("fedavg_full_clip")), None)
    if fed:
        full = fed["fedavg_full_clip"]
        per_round = fed["wall_seconds"] / max(1, fed["rounds"])
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
        figures = [("trainable parameters", fed["trainable_params"], full["trainable_params"]),
                   ("bytes per round (up + down)", sum(fed["bytes_per_round"].values()), sum(full["bytes_per_round"].values())),
                   ("seconds per round", per_round, (cost_bench or {}).get("fedavg_full_clip_seconds_per_round"))]
        for ax, (name, ours, theirs) in zip(axes, figures):
            values = [ours, theirs if theirs else 0]
            ax.bar(["FedCLIP", "FedAvg\nfull CLIP"], values, color=["C0", "C3"])
            ax.set_yscale("log")
            ax.set_title(name, fontsize=9)
            if not theirs:
                ax.text(1, ours, "measure with bench/cost_vs_\nfull_finetune.py --json F,\nthen report --cost F",
                        ha="center", fontsize=7)
        fig.suptitle(f"{title}: cost (from the runs' cost figures)")
        fig.tight_layout()
        paths.append(folder / "cost.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def report(root: Path, make_plots: bool = True, cost_bench: dict | None = None) -> str:
    runs, broken = collect(root)
    out_dir = root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    text = [f"# Report for {root}", "", f"{len(runs)} runs with a summary."]
    groups = defaultdict(list)
    for s in runs:
        groups[(s["dataset"], s.get("model", "?"))].append(s)
    for (dataset, model), group in sorted(groups.items()):
        kept, notes = select_lr(group)
        prefix = "" if len(groups) == 1 else f"{dataset}__{model.replace('/', '--')}__"
        text += ["", f"## {dataset} with {model}", "",
                 "Accuracy in percent: mean ± standard error over seeds (number of seeds)."]
        if notes:
            text += ["", "Learning rate picked by the best mean validation accuracy:"] + [f"- {n}" for n in notes]
        for name, (header, rows) in tables(kept, dataset, model).items():
            text += ["", f"### {name.capitalize()}", "", markdown(header, rows)]
            write_csv(out_dir / f"{prefix}{name}.csv", header, rows)
        if make_plots:
            (out_dir / f"{prefix}plots").mkdir(exist_ok=True)
            for p in plots(kept, out_dir / f"{prefix}plots", f"{dataset} / {model}", cost_bench):
                text.append(f"\nplot: {p}")
    with open(out_dir / "per_round.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PER_ROUND_HEADER)
        w.writerows(per_round_rows(runs))
    if broken:
        text += ["", "## Runs without results", ""] + [f"- {d}: {why}" for d, why in broken]
    (out_dir / "report.md").write_text("\n".join(text) + "\n")
    return "\n".join(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m federate.report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="a multirun folder, or outputs/ (searched recursively)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--cost", help="JSON written by bench/cost_vs_full_finetune.py --json (full-CLIP seconds)")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        print(f"error: {root} is not a folder", file=sys.stderr)
        return 2
    try:
        cost_bench = json.loads(Path(args.cost).read_text()) if args.cost else None
    except (OSError, ValueError) as e:
        print(f"error: cannot read --cost {args.cost}: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(report(root, make_plots=not args.no_plots, cost_bench=cost_bench))
    print(f"\nwrote {root / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
