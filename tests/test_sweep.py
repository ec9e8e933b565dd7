"""hydra/launcher=batched: grouped sweep points write what they would write alone (federate/sweep.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import config, run_cli
from planted import planted, write_cache
from safetensors.torch import load_file

from federate import sweep
from federate.run import run

SIZES = {"alpha": 130, "beta": 100, "gamma": 75, "target": 120}
COMMON = ["model.name=fedclip/planted", "rounds=3"]


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    domains, text = planted(SIZES)
    return write_cache(tmp_path_factory.mktemp("cache") / "planted.h5", domains, text)


def close(a, b, where: str) -> None:
    """Equal structure and values, floats to 1e-6 (absolute, or relative for losses of 10 and more)."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            close(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), where
    else:
        assert a == b, where


def same_job(a: Path, b: Path) -> None:
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for s in (sa, sb):
        s.pop("wall_seconds")
    close(sa, sb, str(b))
    ha, hb = ([json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()] for d in (a, b))
    close(ha, hb, f"{b}/history")
    assert (a / "splits.json").read_text() == (b / "splits.json").read_text()
    ta, tb = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert set(ta) == set(tb)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_batched_sweep_writes_the_same_job_folders_as_the_basic_launcher(cache_file, tmp_path):
    points = ["lr=1e-3,3e-4", "seed=0,1", "target_domain=target,alpha"]
    for launcher in ("basic", "batched"):
        proc = run_cli("federate", "-m", f"hydra/launcher={launcher}", *points, f"cache_file={cache_file}", *COMMON,
                       f"hydra.sweep.dir={tmp_path / launcher}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout
    assert "Launching 8 jobs: 8 in 1 group(s) trained together, 0 on their own" in proc.stdout
    jobs = sorted(p.name for p in (tmp_path / "basic").iterdir() if (p / "summary.json").exists())
    assert len(jobs) == 8
    for job in jobs:
        same_job(tmp_path / "basic" / job, tmp_path / "batched" / job)
        assert (tmp_path / "batched" / job / ".hydra" / "overrides.yaml").exists()
        log = (tmp_path / "batched" / job / "federate.log").read_text()
        assert "round 3/3" in log and "wrote" in log  # the job's own log lines


@pytest.mark.slow
def test_points_that_cannot_be_grouped_still_run(cache_file, tmp_path):
    proc = run_cli("federate", "-m", "hydra/launcher=batched", "method=zeroshot,fedclip", "lr=1e-3,3e-4,0",
                   f"cache_file={cache_file}", "target_domain=target", *COMMON, f"hydra.sweep.dir={tmp_path}",
                   cwd=tmp_path)
    assert "Launching 6 jobs: 2 in 1 group(s) trained together, 4 on their own" in proc.stdout, proc.stdout
    assert proc.returncode == 1  # lr=0 is refused: its jobs fail, the others write their summaries
    summaries = [json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")]
    assert sorted((s["method"], s["lr"]) for s in summaries) == [
        ("fedclip", 3e-4), ("fedclip", 1e-3), ("zeroshot", 3e-4), ("zeroshot", 1e-3)]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    [["method=fedprox", "method.mu=0.1", "engine=batched"], ["method=fedprox", "method.mu=0.5", "engine=batched",
                                                             "seed=1"]],
    [["method=local", "lr=1e-3"], ["method=local", "lr=3e-4", "target_domain=alpha"]],
    [["method=central", "precision=bf16"], ["method=central", "precision=bf16", "lr=3e-4", "seed=2"]],
    [["dataset.classes=[class3,class1,class0]", "engine=batched"],  # one restricted copy serves the group
     ["dataset.classes=[class3,class1,class0]", "engine=batched", "seed=1"]],
    [["partition=iid", "partition.clients_per_domain=3", "clients_per_round=4"],  # each point samples its own
     ["partition=iid", "partition.clients_per_domain=3", "clients_per_round=4", "seed=1", "lr=3e-4"]],
    # personal states: each point's clients keep their own heads / models across its rounds
    [["method=fedper"], ["method=fedper", "seed=1", "lr=3e-4"]],
    [["method=fedrep", "partition=iid", "partition.clients_per_domain=2", "clients_per_round=3", "engine=batched"],
     ["method=fedrep", "partition=iid", "partition.clients_per_domain=2", "clients_per_round=3", "engine=batched",
      "seed=1"]],  # (engine=batched, as fedprox above: with the sequential engine a grouped slot and a client
    # alone agree to float rounding, 1.9e-6 in one weight of 4,096 here, not bit for bit)
    [["method=ditto"], ["method=ditto", "seed=1", "target_domain=alpha"]],
    [["method=apfl"], ["method=apfl", "lr=3e-4"]],
    [["method=fedproto"], ["method=fedproto", "seed=1", "lr=3e-4"]],  # statistics sent instead of weights
    [["method=ccvr"], ["method=ccvr", "seed=1", "target_domain=alpha"]],  # each point calibrates its own model
    [["method=fedpft", "method.head_epochs=3"], ["method=fedpft", "method.head_epochs=3", "seed=1", "lr=3e-4"]],
])
def test_grouped_points_equal_their_runs_alone(cache_file, tmp_path, overrides):
    cfgs = [config("federate", [f"cache_file={cache_file}", "target_domain=target", "lr=1e-3", *COMMON, *o])
            for o in overrides]
    assert len(sweep.groups(cfgs)) == 1
    grouped = [tmp_path / f"grouped{i}" for i in range(len(cfgs))]
    sweep.train_group(cfgs, grouped)
    for i, cfg in enumerate(cfgs):
        assert run(cfg, grouped[i]) == json.loads((grouped[i] / "summary.json").read_text())  # handed over
        run(cfg, tmp_path / f"alone{i}")
        same_job(tmp_path / f"alone{i}", grouped[i])


@pytest.mark.slow
def test_a_sweep_without_a_terminal_summarises_its_rounds_and_the_job_logs_keep_them_in_order(cache_file, tmp_path):
    for launcher in ("basic", "batched"):
        proc = run_cli("federate", "-m", f"hydra/launcher={launcher}", "lr=1e-3,3e-4", f"cache_file={cache_file}",
                       "model.name=fedclip/planted", "rounds=20", f"hydra.sweep.dir={tmp_path / launcher}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout
        console = [line for line in proc.stdout.splitlines() if "round " in line and "/20" in line]
        if launcher == "basic":  # every tenth round of each job
            assert len(console) == 2 * 10 and "round 20/20" in console[-1]
        else:  # the group's progress only
            assert len(console) == 10 and all("group of 2 points" in line for line in console)
        for job in ("0", "1"):
            lines = (tmp_path / launcher / job / "federate.log").read_text().splitlines()
            assert sum("round " in line and "/20  val" in line for line in lines) == 20
            stamps = [line[1:24] for line in lines if line.startswith("[")]
            assert stamps == sorted(stamps)
