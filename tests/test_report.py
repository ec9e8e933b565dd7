"""python -m federate.report: tables from real federate runs, learning-rate selection, failed runs."""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import config, run_cli
from planted import planted, write_cache

from federate.report import method_label, report
from federate.run import run

LRS, SEEDS, TARGETS, METHODS = (1e-3, 2e-4), (0, 1, 2), ("alpha", "gamma"), ("fedclip", "local")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """24 real federate runs laid out like a Hydra multirun folder."""
    root = tmp_path_factory.mktemp("sweep")
    domains, text = planted({"alpha": 120, "beta": 100, "gamma": 90})
    cache = write_cache(root.parent / "planted.h5", domains, text)
    job = 0
    for method in METHODS:
        for target in TARGETS:
            for lr in LRS:
                for seed in SEEDS:
                    cfg = config("federate", [f"cache_file={cache}", "model.name=fedclip/planted", f"method={method}",
                                              f"target_domain={target}", f"lr={lr}", f"seed={seed}", "rounds=3"])
                    run(cfg, root / str(job))
                    job += 1
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def by_hand(root: Path):
    """Per (method, target): the runs of the lr with the best mean val accuracy over seeds."""
    runs = defaultdict(lambda: defaultdict(list))
    for p in root.glob("*/summary.json"):
        s = json.loads(p.read_text())
        runs[(method_label(s), s["target_domain"])][s["lr"]].append(s)
    return {key: max(by_lr.values(), key=lambda rs: statistics.fmean(r["val_mean"] for r in rs))
            for key, by_lr in runs.items()}


def mean_se(values):
    pct = [100 * v for v in values]
    return statistics.fmean(pct), statistics.stdev(pct) / math.sqrt(len(pct))


def test_every_cell_is_the_mean_and_standard_error_of_the_selected_runs(sweep):
    report(sweep, make_plots=False)
    chosen = by_hand(sweep)
    gen = {row["method"]: row for row in read_csv(sweep / "report" / "generalization.csv")}
    overall = {row["target"]: row for row in read_csv(sweep / "report" / "overall.csv")}
    pers = {(row["method"], row["target"]): row for row in read_csv(sweep / "report" / "personalization.csv")}
    for (method, target), runs in chosen.items():
        assert len(runs) == 3
        m, se = mean_se([r["generalization"] for r in runs])
        assert float(gen[method][target]) == pytest.approx(m, abs=1e-4)
        assert float(gen[method][f"{target}_se"]) == pytest.approx(se, abs=1e-4) and gen[method][f"{target}_n"] == "3"
        m, se = mean_se([r["overall"] for r in runs])
        assert float(overall[target][method]) == pytest.approx(m, abs=1e-4)
        assert float(overall[target][f"{method}_se"]) == pytest.approx(se, abs=1e-4)
        row = pers[(method, target)]
        for domain in runs[0]["personalization"]:
            m, se = mean_se([r["personalization"][domain] for r in runs])
            assert float(row[domain]) == pytest.approx(m, abs=1e-4) and float(row[f"{domain}_se"]) == pytest.approx(se, abs=1e-4)
        assert row[target] == ""  # the target has no personalization
    assert sorted(gen) == ["fedclip (rounds=3)", "local (rounds=3)"]
    for method in gen:
        expected = statistics.fmean(mean_se([r["generalization"] for r in chosen[(method, t)]])[0] for t in TARGETS)
        assert float(gen[method]["Avg"]) == pytest.approx(expected, abs=1e-4)
    text = (sweep / "report" / "report.md").read_text()
    assert "± " in text and "Learning rate picked by the best mean validation accuracy" in text


def test_per_round_csv_has_every_run_round_and_client(sweep):
    report(sweep, make_plots=False)
    rows = read_csv(sweep / "report" / "per_round.csv")
    participants = [r for r in rows if r["role"] == "participant"]
    assert len(participants) == 24 * 3 * 2  # runs x rounds x participating clients
    targets = [r for r in rows if r["role"] == "target"]
    assert targets and all(r["client"] == r["target_domain"] for r in targets)
    assert {"train_loss", "val_acc", "test_acc", "seed", "lr"} <= set(rows[0])


def fake_run(root: Path, name: str, **fields) -> None:
    s = {"method": "fedclip", "dataset": "pacs", "model": "openai/clip-vit-base-patch32", "target_domain": "art_painting",
         "seed": 0, "lr": 1e-4, "rounds": 200, "val_mean": 0.5, "generalization": 0.5,
         "personalization": {"cartoon": 0.5}, "personalization_mean": 0.5, "overall": 0.5, **fields}
    (root / name).mkdir(parents=True)
    (root / name / "summary.json").write_text(json.dumps(s))


def test_learning_rate_is_picked_by_validation_never_by_test(tmp_path):
    for seed in (0, 1):  # lr 0.1 validates better but tests worse than lr 0.2
        fake_run(tmp_path, f"a{seed}", lr=0.1, seed=seed, val_mean=0.9, generalization=0.10 + seed / 100)
        fake_run(tmp_path, f"b{seed}", lr=0.2, seed=seed, val_mean=0.5, generalization=0.99)
    text = report(tmp_path, make_plots=False)
    assert "lr 0.1 (mean validation accuracy by lr: 0.1: 90.00%, 0.2: 50.00%)" in text
    assert read_csv(tmp_path / "report" / "generalization.csv")[0]["art_painting"] == "10.5000"


def test_runs_of_another_backend_or_length_are_separate_rows_not_extra_seeds(tmp_path):
    fake_run(tmp_path, "a", seed=0)
    fake_run(tmp_path, "b", seed=1)
    fake_run(tmp_path, "c", seed=0, backend="flower")
    fake_run(tmp_path, "d", seed=0, rounds=5)
    report(tmp_path, make_plots=False)
    rows = {r["method"]: r for r in read_csv(tmp_path / "report" / "generalization.csv")}
    assert rows["fedclip"]["art_painting_n"] == "2"
    assert rows["fedclip (backend=flower)"]["art_painting_n"] == "1" and rows["fedclip (rounds=5)"]["art_painting_n"] == "1"


def test_paper_numbers_appear_for_pacs_with_vit_b32_and_datasets_are_not_mixed(tmp_path):
    for i, target in enumerate(("art_painting", "cartoon", "photo", "sketch")):
        fake_run(tmp_path, f"p{i}", target_domain=target)
        fake_run(tmp_path, f"o{i}", target_domain=target, dataset="mine", model="fedclip/tiny-random-clip")
    text = report(tmp_path, make_plots=False)
    assert "## pacs with openai/clip-vit-base-patch32" in text and "## mine with fedclip/tiny-random-clip" in text
    gen = read_csv(tmp_path / "report" / "pacs__openai--clip-vit-base-patch32__generalization.csv")
    paper = next(r for r in gen if r["method"] == "FedCLIP (paper)")
    assert paper["art_painting"] == "96.3400" and paper["sketch"] == "85.5900" and paper["Avg"] == "94.9000"
    overall = read_csv(tmp_path / "report" / "pacs__openai--clip-vit-base-patch32__overall.csv")
    assert overall[-1]["target"] == "Avg" and overall[-1]["FedCLIP (paper)"] == "95.1300"
    mine = read_csv(tmp_path / "report" / "mine__fedclip--tiny-random-clip__generalization.csv")
    assert [r["method"] for r in mine] == ["fedclip"]  # no paper row for another model or dataset


def test_failed_and_unfinished_runs_are_listed(tmp_path):
    fake_run(tmp_path, "ok")
    hydra = tmp_path / "died" / ".hydra"
    hydra.mkdir(parents=True)
    (hydra / "config.yaml").write_text("lr: 0.1\n")
    (hydra / "hydra.yaml").write_text("hydra:\n  job:\n    name: __main__\n    config_name: federate\n")
    extract_run = tmp_path / "extract_run" / ".hydra"  # not a federate run: not listed
    extract_run.mkdir(parents=True)
    (extract_run / "config.yaml").write_text("batch_size: 32\n")
    (extract_run / "hydra.yaml").write_text("hydra:\n  job:\n    config_name: extract\n")
    (tmp_path / "died" / "federate.log").write_text("round 3/200 ...\nKilled\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    text = report(tmp_path, make_plots=False)
    assert "1 runs with a summary" in text and "## Runs without results" in text
    assert f"{tmp_path / 'died'}: no summary.json (failed or unfinished): Killed" in text
    assert f"{tmp_path / 'broken'}: unreadable summary.json" in text and "extract_run" not in text


def test_cli_prints_the_tables_and_writes_the_report_folder(sweep):
    proc = run_cli("federate.report", str(sweep), cwd=sweep)
    assert proc.returncode == 0, proc.stdout
    assert "### Generalization" in proc.stdout and "### Overall" in proc.stdout
    for name in ("generalization.csv", "personalization.csv", "overall.csv", "per_round.csv", "report.md"):
        assert (sweep / "report" / name).exists()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (sweep / "report" / "plots" / "accuracy_per_round.png").stat().st_size > 10_000
    assert (sweep / "report" / "plots" / "cost.png").exists()
    proc = run_cli("federate.report", str(sweep / "nope"), cwd=sweep)
    assert proc.returncode == 2 and "is not a folder" in proc.stdout
