"""A newcomer's sweeps: a sweep that succeeds ends with one line (its jobs, its folder, the report command);
an interrupted sweep is finished in place by its own command (finished jobs kept, the interrupted one
resumed, the rest run), Ctrl-C says that command, and the report says how many of the planned jobs finished."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, outputs, run_cli, run_federate, same_outputs

from federate.report import report

# Hydra's main, with job 1 (seed 1) interrupted by Ctrl-C when its round 3 starts
INTERRUPTED = """
import sys
from federate.run import CachedBackend
from federate.__main__ import main
train = CachedBackend.train
def cut(self, federation, round_, sampled):
    if int(federation.cfg.seed) == 1 and round_ == 3:
        raise KeyboardInterrupt
    return train(self, federation, round_, sampled)
CachedBackend.train = cut
sys.argv = ["federate", *sys.argv[1:]]
main()
"""


def sweep_args(cache, folder, *extra) -> list[str]:
    return ["-m", f"cache_file={cache}", "model.name=fedclip/planted", "target_domain=target", "rounds=4", "lr=1e-3",
            "seed=0,1,2", *extra, f"hydra.sweep.dir={folder}"]


def python(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)


def last_line(stdout: str) -> str:
    return stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_sweep_that_succeeds_ends_with_its_jobs_its_folder_and_the_report_command(planted_cache, tmp_path):
    folder = tmp_path / "sweep"
    proc = run_cli("federate", *sweep_args(planted_cache, folder, "rounds=1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert last_line(proc.stdout) == (f"[federate][INFO] - 3 jobs finished in {folder}; report: "
                                      f"python -m federate.report {folder}")


@pytest.mark.slow
def test_an_interrupted_sweep_is_finished_in_place_by_its_own_command(planted_cache, tmp_path):
    folder = tmp_path / "sweep"
    proc = python("-c", INTERRUPTED, *sweep_args(planted_cache, folder), cwd=tmp_path)
    assert proc.returncode == 130 and "Traceback" not in proc.stdout, proc.stdout
    line = last_line(proc.stdout)
    assert "interrupted after round 2 of 4" in line and f"in {folder}/1" in line, line
    command = line.split("finish the whole sweep in place (its finished jobs are kept, the interrupted one "
                         "resumes) with: ")[1]
    assert command.startswith("python -m federate -m ") and command.endswith(f"hydra.sweep.dir={folder}")
    assert (folder / "0" / "summary.json").exists() and (folder / "1" / "checkpoint.json").exists()
    assert not (folder / "2").exists()
    text = report(folder, make_plots=False)
    assert f"- sweep {folder}: 1 of 3 jobs finished" in text

    before = (folder / "0" / "summary.json").read_text()
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "federate"]
    proc = run_cli(*args[2:], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert f"kept {folder}/0: it holds a finished run of this config" in proc.stdout
    assert f"resuming {folder}/1 after round 2 of 4" in proc.stdout
    assert last_line(proc.stdout).startswith(f"[federate][INFO] - 3 jobs finished in {folder}")
    assert (folder / "0" / "summary.json").read_text() == before  # kept, not run again
    whole = tmp_path / "whole"
    run_federate(planted_cache, whole, "seed=1", rounds=4)
    same_outputs(outputs(whole), outputs(folder / "1"))  # the interrupted job resumed to the uninterrupted outputs
    assert json.loads((folder / "2" / "summary.json").read_text())["seed"] == 2
    assert f"- sweep {folder}: 3 of 3 jobs finished" in report(folder, make_plots=False)


@pytest.mark.slow
def test_a_finished_batched_sweep_run_again_keeps_every_job(planted_cache, tmp_path):
    folder = tmp_path / "sweep"
    args = sweep_args(planted_cache, folder, "rounds=2", "hydra/launcher=batched")
    assert run_cli("federate", *args, cwd=tmp_path).returncode == 0
    before = {j: (folder / j / "summary.json").read_text() for j in ("0", "1", "2")}
    proc = run_cli("federate", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert all(f"kept {folder}/{j}:" in proc.stdout for j in before) and "round 1/2" not in proc.stdout
    assert {j: (folder / j / "summary.json").read_text() for j in before} == before
    assert last_line(proc.stdout).startswith(f"[federate][INFO] - 3 jobs finished in {folder}")


@pytest.mark.slow
def test_another_sweep_into_a_sweeps_folder_is_refused_naming_the_command_that_finishes_it(planted_cache, tmp_path):
    folder = tmp_path / "sweep"
    assert run_cli("federate", *sweep_args(planted_cache, folder, "rounds=1"), cwd=tmp_path).returncode == 0
    proc = run_cli("federate", *sweep_args(planted_cache, folder, "rounds=2"), cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    assert f"{folder} already holds a run" in proc.stdout
    assert "to finish the sweep it holds in place, run its own command again: python -m federate -m" in proc.stdout


def test_the_report_counts_the_planned_jobs_of_sweeper_params_and_command_line(tmp_path):
    from federate.sweep_folder import planned_jobs

    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      lr: 1e-5,5e-5,1e-4\n      seed: 0,1\n"
        "  overrides:\n    hydra: []\n    task:\n    - seed=0,1,2\n    - target_domain=a,b,c,d\n    - rounds=3\n")
    assert planned_jobs(tmp_path) == 3 * 3 * 4  # the command line's seeds win over the sweeper's
    (tmp_path / "multirun.yaml").write_text("not: [hydra")
    assert planned_jobs(tmp_path) is None
