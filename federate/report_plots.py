"""The report's plots (matplotlib, optional): accuracy per round for each method and target, and the cost
of FedCLIP against FedAvg on the whole CLIP.

A method has one colour in every panel and in the legend; the solid line is the mean validation accuracy
over clients, the dashed one the target accuracy (older histories record it on improving rounds only, so
it is carried forward from those rounds).
"""
from __future__ import annotations

import logging
import math
import statistics
from collections import defaultdict
from pathlib import Path

from extract.files import atomic_path

log = logging.getLogger("federate.report")

TARGET_NONE = "(none)"


def target_label(target: str | None) -> str:
    return TARGET_NONE if target is None else target


def curves(runs: list[dict], label) -> dict[str, dict[str, tuple[list[int], list[float], list[float]]]]:
    """{target: {method: (rounds, mean validation %, mean target %)}}, averaged over the runs (seeds)
    given, which are the ones the tables report."""
    by_cell = defaultdict(lambda: defaultdict(list))
    for s in runs:
        if s.get("_history"):
            by_cell[target_label(s["target_domain"])][label(s)].append(s["_history"])
    out = {}
    for target, by_method in sorted(by_cell.items()):
        out[target] = {}
        for method, histories in sorted(by_method.items()):
            rounds = [r["round"] for r in max(histories, key=len)]
            filled = []
            for h in histories:  # each seed's target accuracy, carried forward over rounds that lack one
                last, row = math.nan, []
                for r in h:
                    if r.get("target_acc") is not None:
                        last = 100 * r["target_acc"]
                    elif "target_acc" in r:  # recorded as null: no target domain
                        last = math.nan
                    row.append(last)
                filled.append(row)

            def mean_at(k, values):
                finite = [v[k] for v in values if k < len(v) and not math.isnan(v[k])]
                return statistics.fmean(finite) if finite else math.nan

            val = [[100 * r["val_mean"] for r in h] for h in histories]
            out[target][method] = (rounds, [mean_at(k, val) for k in range(len(rounds))],
                                   [mean_at(k, filled) for k in range(len(rounds))])
    return out


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e '.[plot]'): no plots")
        return None
    return plt


def accuracy_figure(plt, data: dict, title: str):
    """One panel per target; one colour per method across all panels and the legend."""
    from matplotlib.lines import Line2D

    methods = sorted({m for by_method in data.values() for m in by_method})
    colour = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(data), figsize=(4.5 * len(data), 3.6), squeeze=False, sharey=True)
    for ax, (target, by_method) in zip(axes[0], data.items()):
        for method, (rounds, val, target_acc) in by_method.items():
            ax.plot(rounds, val, color=colour[method], label=f"{method} val")
            if any(not math.isnan(v) for v in target_acc):
                ax.plot(rounds, target_acc, color=colour[method], linestyle="--", drawstyle="steps-post",
                        label=f"{method} target")
        ax.set(title=f"target {target}", xlabel="round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    handles = [Line2D([], [], color=colour[m], label=m) for m in methods]
    handles += [Line2D([], [], color="grey", label="validation (mean over clients)"),
                Line2D([], [], color="grey", linestyle="--", label="target domain")]
    fig.suptitle(title)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * math.ceil(len(handles) / 3), 1, 1))
    return fig


def cost_figure(plt, run: dict, title: str, full_seconds: float | None):
    """Trainable parameters, bytes and seconds per round of one adapter run against FedAvg on the whole
    CLIP; a figure that was not measured is a hatched, labelled placeholder, not a bar of height 0."""
    full = run["fedavg_full_clip"]
    ours = run["method"]
    figures = [("trainable parameters", run["trainable_params"], full["trainable_params"]),
               ("bytes per round (up + down)", sum(run["bytes_per_round"].values()),
                sum(full["bytes_per_round"].values())),
               ("seconds per round", run["wall_seconds"] / max(1, run["rounds"]), full_seconds)]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    for ax, (name, value, theirs) in zip(axes, figures):
        ax.set_yscale("log")
        ax.bar([0], [value], color="C0")
        if theirs:
            ax.bar([1], [theirs], color="C3")
            ax.set_ylim(min(value, theirs) / 3, max(value, theirs) * 3)
        else:
            ax.set_ylim(value / 10, value * 10)
            ax.bar([1], [value * 10], bottom=value / 10, color="none", edgecolor="C3", hatch="//")
            ax.text(1, value, "not\nmeasured", ha="center", va="center", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none"})
        ax.set_xticks([0, 1], [ours, "FedAvg\nfull CLIP"])
        ax.set_title(name, fontsize=9)
    fig.suptitle(f"{title}: cost")
    note = None
    if not full_seconds:
        note = ("FedAvg's seconds per round: python bench/cost_vs_full_finetune.py --json F, "
                "then python -m federate.report <dir> --cost F")
        fig.text(0.5, 0.02, note, ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.07 if note else 0, 1, 1))
    return fig


def has_cost_figures(s: dict) -> bool:
    """A run on the cache whose method sends something, with the cost figures the cost plot needs."""
    def positive(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    full = s.get("fedavg_full_clip")
    return (bool(s.get("cache_identity_sha256")) and positive(s.get("trainable_params"))
            and positive(s.get("wall_seconds")) and positive(s.get("rounds")) and isinstance(full, dict)
            and positive(full.get("trainable_params"))
            and all(isinstance(b, dict) and b and all(positive(v) for v in b.values())
                    for b in (s.get("bytes_per_round"), full.get("bytes_per_round"))))


def save(fig, path: Path) -> None:
    """A PNG written to a temporary file beside `path` and renamed over it (a link there is replaced)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def privacy_figure(plt, curves: dict, baselines: dict, title: str):
    """Overall accuracy against epsilon (log scale): one line per privacy-utility curve, and the same method
    without privacy as a dashed line where the runs have it."""
    fig, ax = plt.subplots(figsize=(7, 4.5 + 0.2 * len(curves)))
    for i, (curve, (points, base_label)) in enumerate(sorted(curves.items())):
        color = f"C{i % 10}"
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=color, label=curve)
        if base_label in baselines:
            ax.axhline(baselines[base_label], color=color, linestyle="--", linewidth=1, label=f"{base_label}: no DP")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta as recorded; DP-SGD: the worst client)")
    ax.set_ylabel("overall accuracy (%)")
    ax.set_title(f"{title}: privacy and utility", fontsize=10)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)  # below: no point hidden
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_plots(runs: list[dict], folder: Path, title: str, label, cost_bench: dict | None = None,
                privacy: tuple[dict, dict] | None = None) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    if privacy and privacy[0]:
        fig = privacy_figure(plt, privacy[0], privacy[1], title)
        paths.append(folder / "privacy_utility.png")
        save(fig, paths[-1])
        plt.close(fig)
    data = curves(runs, label)
    if data:
        fig = accuracy_figure(plt, data, title)
        paths.append(folder / "accuracy_per_round.png")
        save(fig, paths[-1])
        plt.close(fig)
    fed = next((s for s in sorted(runs, key=lambda s: str(s["_dir"])) if has_cost_figures(s)), None)
    if fed:
        fig = cost_figure(plt, fed, title, (cost_bench or {}).get("fedavg_full_clip_seconds_per_round"))
        paths.append(folder / "cost.png")
        save(fig, paths[-1])
        plt.close(fig)
    return paths
