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

PACS = "pacs__openai--clip-vit-base-patch32"
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


def ours(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["method"] != "FedCLIP (paper)"]


def tables_of(root: Path, name: str = "planted__fedclip--planted") -> Path:
    """The folder of one table set: report/<dataset>__<model>[__cache-<id>]/."""
    return root / "report" / name


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


@pytest.mark.slow
def test_every_cell_is_the_mean_and_standard_error_of_the_selected_runs(sweep):
    report(sweep, make_plots=False)
    chosen = by_hand(sweep)
    gen = {row["method"]: row for row in read_csv(tables_of(sweep) / "generalization.csv")}
    overall = {row["target"]: row for row in read_csv(tables_of(sweep) / "overall.csv")}
    pers = {(row["method"], row["target"]): row for row in read_csv(tables_of(sweep) / "personalization.csv")}
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


@pytest.mark.slow
def test_per_round_csv_has_every_run_round_and_client(sweep):
    report(sweep, make_plots=False)
    rows = read_csv(sweep / "report" / "per_round.csv")
    participants = [r for r in rows if r["role"] == "participant"]
    assert len(participants) == 24 * 3 * 2  # runs x rounds x participating clients
    targets = [r for r in rows if r["role"] == "target"]
    assert targets and all(r["client"] == r["target_domain"] for r in targets)
    assert {"train_loss", "val_acc", "test_acc", "seed", "lr"} <= set(rows[0])


def fake_run(root: Path, name: str, history: list[dict] | None = None, **fields) -> Path:
    s = {"method": "fedclip", "dataset": "pacs", "model": "openai/clip-vit-base-patch32", "target_domain": "art_painting",
         "seed": 0, "lr": 1e-4, "rounds": 200, "val_mean": 0.5, "generalization": 0.5,
         "personalization": {"cartoon": 0.5}, "personalization_mean": 0.5, "overall": 0.5, **fields}
    (root / name).mkdir(parents=True)
    (root / name / "summary.json").write_text(json.dumps(s))
    if history is not None:
        (root / name / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return root / name


def test_learning_rate_is_picked_by_validation_never_by_test(tmp_path):
    for seed in (0, 1):  # lr 0.1 validates better but tests worse than lr 0.2
        fake_run(tmp_path, f"a{seed}", lr=0.1, seed=seed, val_mean=0.9, generalization=0.10 + seed / 100)
        fake_run(tmp_path, f"b{seed}", lr=0.2, seed=seed, val_mean=0.5, generalization=0.99)
    text = report(tmp_path, make_plots=False)
    assert "lr 0.1 (mean validation accuracy by lr: 0.1: 90.00%, 0.2: 50.00%)" in text
    assert read_csv(tables_of(tmp_path, PACS) / "generalization.csv")[0]["art_painting"] == "10.5000"


def test_runs_of_another_backend_or_length_are_separate_rows_not_extra_seeds(tmp_path):
    fake_run(tmp_path, "a", seed=0)
    fake_run(tmp_path, "b", seed=1)
    fake_run(tmp_path, "c", seed=0, backend="flower")
    fake_run(tmp_path, "d", seed=0, rounds=5)
    report(tmp_path, make_plots=False)
    rows = {r["method"]: r for r in read_csv(tables_of(tmp_path, PACS) / "generalization.csv")}
    assert rows["fedclip"]["art_painting_n"] == "2"
    assert rows["fedclip (backend=flower)"]["art_painting_n"] == "1" and rows["fedclip (rounds=5)"]["art_painting_n"] == "1"


def test_paper_numbers_appear_for_pacs_with_vit_b32_and_datasets_are_not_mixed(tmp_path):
    for i, target in enumerate(("art_painting", "cartoon", "photo", "sketch")):
        fake_run(tmp_path, f"p{i}", target_domain=target)
        fake_run(tmp_path, f"o{i}", target_domain=target, dataset="mine", model="fedclip/tiny-random-clip")
    text = report(tmp_path, make_plots=False)
    assert "## pacs with openai/clip-vit-base-patch32" in text and "## mine with fedclip/tiny-random-clip" in text
    gen = read_csv(tables_of(tmp_path, PACS) / "generalization.csv")
    paper = next(r for r in gen if r["method"] == "FedCLIP (paper)")
    assert paper["art_painting"] == "96.3400" and paper["sketch"] == "85.5900" and paper["Avg"] == "94.9000"
    overall = read_csv(tables_of(tmp_path, PACS) / "overall.csv")
    assert overall[-2]["target"] == "Avg" and overall[-2]["FedCLIP (paper)"] == "95.1300"
    assert overall[-1]["target"] == "total MB sent per run" and overall[-1]["FedCLIP (paper)"] == ""
    mine = read_csv(tables_of(tmp_path, "mine__fedclip--tiny-random-clip") / "generalization.csv")
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


@pytest.mark.slow
def test_cli_prints_the_tables_and_writes_the_report_folder(sweep):
    proc = run_cli("federate.report", str(sweep), cwd=sweep)
    assert proc.returncode == 0, proc.stdout
    assert "### Generalization" in proc.stdout and "### Overall" in proc.stdout
    for name in ("per_round.csv", "report.md"):
        assert (sweep / "report" / name).exists()
    for name in ("generalization.csv", "personalization.csv", "overall.csv"):
        assert (tables_of(sweep) / name).exists()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tables_of(sweep) / "accuracy_per_round.png").stat().st_size > 10_000
    assert (tables_of(sweep) / "cost.png").exists()
    proc = run_cli("federate.report", str(sweep / "nope"), cwd=sweep)
    assert proc.returncode == 2 and "is not a folder" in proc.stdout


# ---------------------------------------------------------------- what runs computed on, and repeats
IDENTITY_A, IDENTITY_B = "a" * 64, "b" * 64


def test_caches_with_other_content_are_separate_tables_never_seeds_of_one_cell(tmp_path):
    sums = {"text/embeddings": "1" * 64, "domains/cartoon/image_embeddings": "2" * 64}
    for seed in (0, 1):
        fake_run(tmp_path, f"a{seed}", seed=seed, generalization=0.9, cache_identity_sha256=IDENTITY_A,
                 cache_checksums=sums)
    # another cache of the same dataset and model name (other prompts or cache_dtype: another identity)
    fake_run(tmp_path, "b", seed=2, generalization=0.2, cache_identity_sha256=IDENTITY_B, cache_checksums=sums)
    # the first cache rebuilt at the same path between seeds: same identity, other embeddings
    fake_run(tmp_path, "c", seed=3, generalization=0.4, cache_identity_sha256=IDENTITY_A,
             cache_checksums={**sums, "domains/cartoon/image_embeddings": "3" * 64})
    fake_run(tmp_path, "old", seed=4, generalization=0.6)  # an older run without an identity
    text = report(tmp_path, make_plots=False)
    cells = {}
    for folder in sorted((tmp_path / "report").iterdir()):
        if folder.is_dir():
            row = read_csv(folder / "generalization.csv")[0]
            cells[folder.name] = (row["art_painting"], row["art_painting_n"])
    assert cells == {f"{PACS}__cache-aaaaaaaa": ("90.0000", "2"), f"{PACS}__cache-aaaaaaaa-2": ("40.0000", "1"),
                     f"{PACS}__cache-bbbbbbbb": ("20.0000", "1"), PACS: ("60.0000", "1")}
    assert "(cache aaaaaaaaaaaa)" in text and "(cache identity not recorded: older runs)" in text
    assert f"(cache aaaaaaaaaaaa, other embeddings than {PACS}__cache-aaaaaaaa: the cache was rebuilt)" in text


def test_split_file_runs_on_other_splits_are_separate_tables(tmp_path):
    for i, splits in enumerate(("c" * 64, "c" * 64, "d" * 64)):
        fake_run(tmp_path, f"s{i}", seed=i, split_file="/data/splits.json", splits_sha256=splits,
                 cache_identity_sha256=IDENTITY_A)
    fake_run(tmp_path, "seeded", seed=0, cache_identity_sha256=IDENTITY_A, splits_sha256="e" * 64)
    report(tmp_path, make_plots=False)
    rows = {f.name: ours(read_csv(f / "generalization.csv")) for f in (tmp_path / "report").iterdir() if f.is_dir()}
    assert [(r["method"], r["art_painting_n"]) for r in rows[f"{PACS}__cache-aaaaaaaa__splits-cccccccc"]] == \
        [("fedclip (split_file=cccccccc)", "2")]
    assert [r["method"] for r in rows[f"{PACS}__cache-aaaaaaaa__splits-dddddddd"]] == ["fedclip (split_file=dddddddd)"]
    # a seeded split is a function of the seed: its splits' checksum does not split the table
    assert [r["method"] for r in rows[f"{PACS}__cache-aaaaaaaa"]] == ["fedclip"]


def test_a_seed_run_twice_counts_once_and_the_report_says_which_run_it_kept(tmp_path):
    import os

    for sweep, gens in (("sweep1", (0.1, 0.2)), ("sweep2", (0.3, 0.4, 0.8))):
        for seed, g in enumerate(gens):
            d = fake_run(tmp_path / sweep, str(seed), seed=seed, generalization=g)
            os.utime(d / "summary.json", (1000 + 10 * (sweep == "sweep2"), 1000 + 10 * (sweep == "sweep2")))
    text = report(tmp_path, make_plots=False)
    row = read_csv(tables_of(tmp_path, PACS) / "generalization.csv")[0]
    m, se = mean_se([0.3, 0.4, 0.8])  # the newest run of each seed: 3 seeds, not 5
    assert row["art_painting_n"] == "3"
    assert float(row["art_painting"]) == pytest.approx(m, abs=1e-4)
    assert float(row["art_painting_se"]) == pytest.approx(se, abs=1e-4)
    assert f"seed 0: kept {tmp_path / 'sweep2' / '0'} (the newest); left out {tmp_path / 'sweep1' / '0'}" in text


@pytest.mark.parametrize("setting", [
    {"engine": "generic"}, {"split_file": "/data/splits.json"}, {"optimizer": {"name": "sgd", "momentum": 0.9}},
    {"backbone": {"name": "alexnet", "pretrained": False}}, {"partition": {"name": "dirichlet", "alpha": 0.5}},
    {"clients_per_round": 2}, {"selection": "last"}, {"adapter": {"name": "coop", "n_ctx": 16}},
    {"config": {"finetune_epochs": 2}},
])
def test_settings_that_change_results_make_another_row(tmp_path, setting):
    fake_run(tmp_path, "a", seed=0, partition={"name": "domain"}, clients_per_round=None, selection="val_mean")
    fake_run(tmp_path, "b", seed=0, **setting)
    report(tmp_path, make_plots=False)
    rows = ours(read_csv(tables_of(tmp_path, PACS) / "generalization.csv"))
    assert len(rows) == 2 and all(r["art_painting_n"] == "1" for r in rows), [r["method"] for r in rows]


def test_a_backbone_run_without_an_engine_has_no_engine_in_its_label():
    assert method_label({"method": "fedavg_full", "backbone": "clip", "engine": None}) == "fedavg_full/clip"


def test_runs_that_lost_clients_are_named(tmp_path):
    fake_run(tmp_path, "flower", backend="flower", dropped_clients=["gamma"],
             stopped="only 1 client(s) left, fewer than flower.min_clients=2")
    text = report(tmp_path, make_plots=False)
    assert (f"- {tmp_path / 'flower'}: stopped early: only 1 client(s) left, fewer than flower.min_clients=2; "
            'dropped clients: ["gamma"]') in text


def test_the_oracle_row_says_it_is_an_upper_bound(tmp_path):
    fake_run(tmp_path, "a", selection="oracle")
    assert "fedclip (selection=oracle: an upper bound)" in report(tmp_path, make_plots=False)


# ---------------------------------------------------------------- names from runs never leave the folder
def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("dataset, model", [("../../escaped", "openai/clip"), ("{tmp}/abs", "../../../m"),
                                            ("../..", "a/../../b")])
def test_names_from_summaries_are_file_names_inside_the_report_folder(tmp_path, dataset, model):
    dataset = dataset.format(tmp=tmp_path)  # an absolute path, which would land beside the runs
    root = tmp_path / "a" / "b" / "runs"
    fake_run(root, "r", dataset=dataset, model=model, personalization={"../../dom": 0.5},
             target_domain="/etc/target")
    fake_run(root, "other")  # several table sets: each gets a folder named after its dataset and model
    before = files_under(tmp_path)
    report(root, make_plots=True)
    written = files_under(tmp_path) - before
    assert written and all((root / "report") in p.parents for p in written), written
    assert all(p.parent.parent == root / "report" or p.parent == root / "report" for p in written)


def test_a_report_folder_that_holds_other_files_is_not_overwritten(tmp_path):
    fake_run(tmp_path, "r")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "notes.csv").write_text("mine")
    proc = run_cli("federate.report", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "holds files that are not a report" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stdout and (tmp_path / "report" / "notes.csv").read_text() == "mine"


# ---------------------------------------------------------------- damaged runs are listed, not fatal
@pytest.mark.parametrize("content, why", [
    ("3", "malformed summary.json: it holds a int, not a JSON object"),
    ('{"method": 1}', "malformed summary.json: it lacks dataset"),
    (None, "malformed summary.json: val_mean is null, not an accuracy in [0, 1]"),
    ("list", "malformed summary.json: personalization is [0.5], not an object {client: accuracy in [0, 1]}"),
    ("seed", 'malformed summary.json: seed is "0", not an integer'),
    ("nan", "malformed summary.json: generalization is NaN, not an accuracy in [0, 1] or null"),
])
def test_a_malformed_summary_is_listed_and_the_report_goes_on(tmp_path, content, why):
    fake_run(tmp_path, "ok")
    bad = fake_run(tmp_path, "bad")
    s = json.loads((bad / "summary.json").read_text())
    if content is None:
        s["val_mean"] = None
    elif content == "list":
        s["personalization"] = [0.5]
    elif content == "seed":
        s["seed"] = "0"
    elif content == "nan":
        s["generalization"] = math.nan
    (bad / "summary.json").write_text(json.dumps(s) if content in (None, "list", "seed", "nan") else content)
    proc = run_cli("federate.report", str(tmp_path), "--no-plots", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stdout, proc.stdout
    assert "1 runs with a summary" in proc.stdout and f"- {bad}: {why}" in proc.stdout


def test_a_truncated_history_and_a_hydra_folder_without_hydra_yaml_are_listed(tmp_path):
    fake_run(tmp_path, "ok", history=[{"round": 1, "val_acc": {"cartoon": 0.5}, "val_mean": 0.5}])
    cut = fake_run(tmp_path, "cut")
    (cut / "history.jsonl").write_text('{"round": 1, "val_acc": {"cartoon": 0.5}, "val_mean": 0.5}\n{"round": 2, "va')
    hydra = tmp_path / "nohydra" / ".hydra"
    hydra.mkdir(parents=True)
    (hydra / "config.yaml").write_text("method:\n  name: fedclip\ntarget_domain: null\nlr: 0.1\n")
    (tmp_path / "nohydra" / "federate.log").write_text(
        "[2026-11-25 10:00:00,000][federate][INFO] - fedclip on pacs\n"
        "[2026-11-25 10:00:01,000][federate][ERROR] - no embedding cache at cache/pacs/x.h5; build it first with: "
        "python -m extract dataset=pacs\n")
    text = report(tmp_path, make_plots=True)
    assert "1 runs with a summary" in text
    assert f"- {cut}: history.jsonl line 2 is not JSON (a truncated or damaged file)" in text
    assert (f"- {tmp_path / 'nohydra'}: no summary.json (failed or unfinished): no embedding cache at "
            "cache/pacs/x.h5; build it first with: python -m extract dataset=pacs") in text


# ---------------------------------------------------------------- several clients per domain, no target
def test_tables_are_per_domain_with_the_spread_over_clients(tmp_path):
    clients = {"cartoon/0": 0.6, "cartoon/1": 0.8, "photo/0": 0.9, "photo/1": 0.5, "photo/2": 0.7}
    for seed in (0, 1):
        fake_run(tmp_path, f"r{seed}", seed=seed, personalization=clients,
                 personalization_domains={"cartoon": 0.7, "photo": 0.7},
                 personalization_spread={"mean": 0.7, "worst": 0.5, "p10": 0.54},
                 partition={"name": "dirichlet", "clients_per_domain": 2, "alpha": 0.5, "min_rows": 10},
                 clients={c: {"domain": c.split("/")[0]} for c in clients})
    report(tmp_path, make_plots=False)
    row = read_csv(tables_of(tmp_path, PACS) / "personalization.csv")[0]
    assert "cartoon/0" not in row and row["cartoon"] == "70.0000" and row["photo"] == "70.0000"
    assert row["clients worst"] == "50.0000" and row["clients p10"] == "54.0000" and row["clients mean"] == "70.0000"


def test_without_a_target_domain_generalization_is_not_a_number(tmp_path):
    fake_run(tmp_path, "r", target_domain=None, generalization=None, personalization={"cartoon": 0.5, "photo": 0.7},
             overall=0.6, personalization_mean=0.6)
    text = report(tmp_path, make_plots=True)
    gen = read_csv(tables_of(tmp_path, PACS) / "generalization.csv")[0]
    assert gen["(none)"] == "" and gen["Avg"] == ""
    assert "| fedclip | — | — |" in text
    overall = read_csv(tables_of(tmp_path, PACS) / "overall.csv")[0]
    assert overall["target"] == "(none)" and overall["fedclip"] == "60.0000"


# ---------------------------------------------------------------- re-selection from full histories
def full_row(round_, val, target, test, val_rows=None):
    return {"round": round_, "sampled": list(test), "train_loss": {c: 1.0 for c in test}, "val_acc": val,
            "test_acc": test, "target_acc": target, "val_mean": statistics.fmean(val.values()),
            "val_rows": statistics.fmean(val.values()) if val_rows is None else val_rows}


HISTORY = [full_row(1, {"cartoon": 0.5, "photo": 0.5}, 0.30, {"cartoon": 0.4, "photo": 0.4}),
           full_row(2, {"cartoon": 0.9, "photo": 0.7}, 0.50, {"cartoon": 0.8, "photo": 0.6}, val_rows=0.70),
           full_row(3, {"cartoon": 0.6, "photo": 0.8}, 0.90, {"cartoon": 0.5, "photo": 0.9}, val_rows=0.75),
           full_row(4, {"cartoon": 0.6, "photo": 0.6}, 0.70, {"cartoon": 0.6, "photo": 0.2})]


@pytest.mark.parametrize("rule, round_", [("val_mean", 2), ("val_rows", 3), ("last", 4), ("oracle", 3)])
def test_selection_option_recomputes_each_run_from_its_history(tmp_path, rule, round_):
    fake_run(tmp_path, "new", history=HISTORY, personalization={"cartoon": 0.8, "photo": 0.6}, generalization=0.5,
             val_mean=0.8, best_round=2, selection="val_mean")
    old = fake_run(tmp_path, "old", method="local", generalization=0.25,
                   history=[{"round": 1, "val_acc": {"cartoon": 0.5}, "val_mean": 0.5}])
    proc = run_cli("federate.report", str(tmp_path), "--no-plots", "--selection", rule, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    rows = {r["method"]: r for r in read_csv(tables_of(tmp_path, PACS) / "generalization.csv")}
    row = HISTORY[round_ - 1]
    label = {"val_mean": "fedclip", "oracle": "fedclip (selection=oracle: an upper bound)"}.get(
        rule, f"fedclip (selection={rule})")
    assert float(rows[label]["art_painting"]) == pytest.approx(100 * row["target_acc"])
    pers = {r["method"]: r for r in read_csv(tables_of(tmp_path, PACS) / "personalization.csv")}
    assert float(pers[label]["photo"]) == pytest.approx(100 * row["test_acc"]["photo"])
    assert "runs keep their own selection: their history does not record every metric every round" in proc.stdout
    assert str(old) in proc.stdout
    assert rows["local"]["art_painting"] == "25.0000"  # the older run keeps its own selection


def test_selection_option_refuses_an_unknown_rule(tmp_path):
    proc = run_cli("federate.report", str(tmp_path), "--selection", "best_test", cwd=tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'best_test'" in proc.stdout


# ---------------------------------------------------------------- plots
def test_a_method_has_one_colour_in_every_panel_and_in_the_legend(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    from federate.report_plots import accuracy_figure, curves

    history = [{"round": r, "val_acc": {"cartoon": 0.5}, "val_mean": 0.5, "target_acc": 0.4} for r in (1, 2)]
    runs = [{"method": m, "target_domain": t, "_history": history} for m, t in
            (("central", "art_painting"), ("local", "art_painting"), ("fedclip", "photo"), ("local", "photo"))]
    fig = accuracy_figure(plt, curves(runs, lambda s: s["method"]), "t")
    legend = {h.get_label(): h.get_color() for h in fig.legends[0].legend_handles}
    for ax in fig.axes:
        for line in ax.get_lines():
            method = line.get_label().rsplit(" ", 1)[0]
            assert line.get_color() == legend[method], (ax.get_title(), method)
    plt.close(fig)


def test_the_per_round_plot_shows_the_learning_rate_the_tables_picked(tmp_path):
    from federate.report_plots import curves

    def history(val):
        return [{"round": r, "val_acc": {"cartoon": val}, "val_mean": val, "target_acc": val / 2} for r in (1, 2)]
    for seed in (0, 1):
        fake_run(tmp_path, f"good{seed}", seed=seed, lr=0.1, val_mean=0.9, history=history(0.9))
        fake_run(tmp_path, f"bad{seed}", seed=seed, lr=0.2, val_mean=0.3, history=history(0.3))
    from federate.report import drop_repeats, select_lr
    from federate.report_runs import collect

    kept, _ = select_lr(drop_repeats(collect(tmp_path).summaries)[0])
    rounds, val, target = curves(kept, method_label)["art_painting"]["fedclip"]
    assert val == [90.0, 90.0] and target == [45.0, 45.0]


def test_the_cost_plot_marks_an_unmeasured_bar_and_its_texts_do_not_overlap(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    from federate.report_plots import cost_figure

    run_ = {"method": "fedclip", "trainable_params": 525_312, "bytes_per_round": {"up": 6e6, "down": 6e6},
            "wall_seconds": 40.0, "rounds": 200,
            "fedavg_full_clip": {"trainable_params": 151_277_313, "bytes_per_round": {"up": 1.8e9, "down": 1.8e9}}}
    fig = cost_figure(plt, run_, "pacs / ViT-B/32", None)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(plt.Text) if t.get_text().strip() and t.get_visible()]
    assert any(t.get_text() == "not\nmeasured" for t in texts)
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            assert not box_a.overlaps(box_b), (a, b)
    plt.close(fig)


def test_every_table_has_the_megabytes_each_method_sent_per_run(tmp_path):
    """A one-shot method and 200 rounds side by side: bytes_total (up + down) in MB, the mean over runs."""
    fake_run(tmp_path, "a", bytes_total={"up": 3_000_000, "down": 1_000_000})
    fake_run(tmp_path, "b", seed=1, bytes_total={"up": 5_000_000, "down": 1_000_000})
    fake_run(tmp_path, "p", method="fedpft", rounds=1, bytes_total={"up": 20_000, "down": 40_000})
    fake_run(tmp_path, "old", method="local")  # (recorded no bytes)
    text = report(tmp_path, make_plots=False)
    folder = tables_of(tmp_path, PACS)
    gen = {r["method"]: r for r in read_csv(folder / "generalization.csv")}
    assert gen["fedclip"]["total MB sent per run"] == "5.0000" and gen["fedpft (rounds=1)"]["total MB sent per run"] == "0.0600"
    assert gen["local"]["total MB sent per run"] == ""
    pers = {r["method"]: r for r in read_csv(folder / "personalization.csv")}
    assert pers["fedclip"]["total MB sent per run"] == "5.0000"
    overall = {r["target"]: r for r in read_csv(folder / "overall.csv")}
    assert overall["total MB sent per run"]["fedpft (rounds=1)"] == "0.0600"
    assert "| fedpft (rounds=1) | 50.00 (1) | 50.00 | 0.06 |" in text


def test_a_run_whose_method_changed_its_selected_model_after_the_rounds_keeps_its_selection(tmp_path):
    fake_run(tmp_path, "ccvr", method="ccvr", history=HISTORY, personalization={"cartoon": 0.9, "photo": 0.9},
             generalization=0.95, best_round=2, after_rounds="calibration")
    proc = run_cli("federate.report", str(tmp_path), "--no-plots", "--selection", "last", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    rows = {r["method"]: r for r in read_csv(tables_of(tmp_path, PACS) / "generalization.csv")}
    assert rows["ccvr"]["art_painting"] == "95.0000" and "changed the selected round's model after the rounds" in proc.stdout
