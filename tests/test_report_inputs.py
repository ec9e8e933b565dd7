"""The report checks every number it reads back (summary.json, history.jsonl): a damaged run is listed with
the reason, never tabulated; files that are not regular files, too large or too deeply nested are refused
in one line, without hanging or a traceback."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
from conftest import run_cli

from federate import report_runs
from federate.report import report

PACS = "pacs__openai--clip-vit-base-patch32"


def full_row(round_, val=0.5, target=0.5, test=0.5, **extra):
    row = {"round": round_, "sampled": ["cartoon", "photo"], "train_loss": {"cartoon": 1.0, "photo": 1.0},
           "val_acc": {"cartoon": val, "photo": val}, "test_acc": {"cartoon": test, "photo": test},
           "target_acc": target, "val_mean": val, "val_rows": val}
    row.update(extra)
    return row


def fake_run(root: Path, name: str, history=None, **fields) -> Path:
    s = {"method": "fedclip", "dataset": "pacs", "model": "openai/clip-vit-base-patch32", "target_domain": "art_painting",
         "seed": 0, "lr": 1e-4, "rounds": 2, "val_mean": 0.5, "generalization": 0.5,
         "personalization": {"cartoon": 0.5, "photo": 0.5}, "personalization_mean": 0.5, "overall": 0.5, **fields}
    (root / name).mkdir(parents=True)
    (root / name / "summary.json").write_text(json.dumps(s))
    if history is not None:
        lines = [r if isinstance(r, str) else json.dumps(r) for r in history]
        (root / name / "history.jsonl").write_text("".join(line + "\n" for line in lines))
    return root / name


def listed(text: str, run: Path) -> str:
    """The reason the report gives for a run it left out."""
    line = next((ln for ln in text.splitlines() if ln.startswith(f"- {run}: ")), None)
    assert line is not None, text
    return line[len(f"- {run}: "):]


@pytest.mark.parametrize("row, why", [
    (full_row(2, test=7.0), "history.jsonl line 2: test_acc is {\"cartoon\": 7.0, \"photo\": 7.0}, not an object "
                            "{client: accuracy in [0, 1]}"),
    (full_row(2, test=math.nan), "test_acc is {\"cartoon\": NaN"),
    (full_row(2, test=True), "test_acc is {\"cartoon\": true"),
    (full_row(2, val_mean=1e300), "val_mean is 1e+300, not an accuracy in [0, 1]"),
    (full_row(2, val_rows="0.7"), "val_rows is \"0.7\", not an accuracy in [0, 1]"),
    (full_row(2, target=2.0), "target_acc is 2.0, not an accuracy in [0, 1] or null"),
    (full_row(True), "round is true, not an integer"),
    (full_row(2.5), "round is 2.5, not an integer"),
    (full_row(1), "round 1 does not follow round 1"),
    (full_row(2, train_loss={"cartoon": math.inf}), "train_loss is {\"cartoon\": Infinity}, not an object "
                                                    "{client: finite number}"),
    (full_row(2, sampled="cartoon"), "sampled is \"cartoon\", not a list of client names"),
])
def test_a_damaged_history_is_listed_with_the_reason_and_not_tabulated(tmp_path, row, why):
    fake_run(tmp_path, "ok", history=[full_row(1), full_row(2)])
    bad = fake_run(tmp_path, "bad", history=[full_row(1), row], seed=1, generalization=0.9)
    text = report(tmp_path, make_plots=False)
    assert "1 runs with a summary" in text
    assert why in listed(text, bad)
    gen = (tmp_path / "report" / PACS / "generalization.csv").read_text()
    assert "50.0000" in gen and "90.0000" not in gen


@pytest.mark.parametrize("field, value, why", [
    ("val_acc", {"cartoon": 7.0}, "val_acc is {\"cartoon\": 7.0}, not an object {client: accuracy in [0, 1]}"),
    ("rounds", True, "rounds is true, not an integer >= 0"),
    ("local_epochs", 1.5, "local_epochs is 1.5, not an integer >= 0"),
    ("best_round", -3, "best_round is -3, not an integer >= 0"),
    ("mu", "0.1", "mu is \"0.1\", not a finite number"),
    ("lr", True, "lr is true, not a positive number"),
    ("personalization_mean", True, "personalization_mean is true, not an accuracy in [0, 1]"),
])
def test_a_summary_number_of_the_wrong_type_or_range_is_listed(tmp_path, field, value, why):
    fake_run(tmp_path, "ok")
    bad = fake_run(tmp_path, "bad", seed=1, **{field: value})
    text = report(tmp_path, make_plots=False)
    assert "1 runs with a summary" in text and why in listed(text, bad)


def test_selection_val_rows_on_a_damaged_val_rows_lists_the_run_without_a_traceback(tmp_path):
    fake_run(tmp_path, "ok", history=[full_row(1), full_row(2)])
    bad = fake_run(tmp_path, "bad", history=[full_row(1, val_rows="abc"), full_row(2)], seed=1)
    proc = run_cli("federate.report", str(tmp_path), "--no-plots", "--selection", "val_rows", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stdout, proc.stdout
    assert f"- {bad}: history.jsonl line 1: val_rows is \"abc\", not an accuracy in [0, 1]" in proc.stdout


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_is_one_line(tmp_path):
    fake_run(tmp_path, "ok")
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "summary.json").write_text('{"method": ' + nested(100_000) + "}")
    hist = fake_run(tmp_path, "hist", history=[full_row(1), '{"round": 2, "val_acc": ' + nested(100_000) + "}"], seed=1)
    proc = run_cli("federate.report", str(tmp_path), "--no-plots", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stdout and "RecursionError" not in proc.stdout, proc.stdout
    assert "nested too deeply" in listed(proc.stdout, deep)
    assert "history.jsonl line 2" in listed(proc.stdout, hist) and "nested too deeply" in listed(proc.stdout, hist)


def test_a_fifo_summary_or_history_or_log_does_not_hang_the_report(tmp_path):
    fake_run(tmp_path, "ok")
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "summary.json")
    hist = fake_run(tmp_path, "hist", seed=1)
    os.mkfifo(hist / "history.jsonl")
    died = tmp_path / "died"
    (died / ".hydra").mkdir(parents=True)
    os.mkfifo(died / ".hydra" / "hydra.yaml")
    os.mkfifo(died / "federate.log")
    proc = run_cli("federate.report", str(tmp_path), "--no-plots", cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stdout, proc.stdout
    assert "summary.json is not a regular file" in listed(proc.stdout, fifo)
    assert "history.jsonl is not a regular file" in listed(proc.stdout, hist)
    assert listed(proc.stdout, died).startswith("no summary.json")


def test_a_summary_larger_than_the_bound_is_listed_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(report_runs, "MAX_SUMMARY_BYTES", 1000)
    fake_run(tmp_path, "ok")
    big = fake_run(tmp_path, "big", seed=1, notes="x" * 2000)
    text = report(tmp_path, make_plots=False)
    assert "summary.json is larger than 1000 bytes" in listed(text, big)


def test_a_clean_history_still_reselects(tmp_path):
    fake_run(tmp_path, "ok", history=[full_row(1, val=0.4, target=0.1), full_row(2, val=0.6, target=0.3)])
    text = report(tmp_path, make_plots=False, rule="last")
    assert "1 runs with a summary" in text and "Runs without results" not in text
    with open(tmp_path / "report" / PACS / "generalization.csv") as f:
        row = next(csv.DictReader(f))
    assert row["method"] == "fedclip (rounds=2, selection=last)" and float(row["art_painting"]) == 30.0
