"""Hydra callback for `python -m federate`, registered in conf/federate.yaml:

    hydra:
      callbacks:
        federate_errors:
          _target_: federate.callbacks.FederateErrors

- Before a run or a sweep, the output folder (hydra.run.dir, or hydra.sweep.dir with -m) must be a folder
  that can be written; otherwise one line names it and the process exits with status 2 (Hydra would
  otherwise fail with a traceback when it creates the folder or opens the job's log file).
- A folder that holds a run (summary.json or history.jsonl, anywhere under a sweep's folder) is refused the
  same way, before Hydra writes the job's .hydra/ files over the finished run's; a single run's folder with a
  checkpoint and no summary is an interrupted run, which the same command resumes. So is a sweep's folder
  made by the same overrides (its multirun.yaml): the same sweep command finishes it in place, keeping its
  finished jobs and resuming the interrupted one (federate/sweep_folder.py).
- A folder that is a symbolic link (the output folder, or a job folder under a sweep's folder) is refused the
  same way: nothing is written through a link.
- A single run refused before it wrote anything takes away the folder this process created for it
  (`remove_unused_run_folder`), so that no empty run folder is left for the report to list.
- After a sweep, the jobs of this sweep without a fresh summary.json (a failed job logs its one-line error
  and returns, so that the later points still run) are named in one line, and the process exits with
  status 1. `python -m federate.report <sweep dir>` lists them too, with the last line of each job's log.
  A sweep whose jobs all finished ends with one line: how many, its folder and the report command.

Messages go to stderr, not through logging: at the end of a sweep the root logger still writes to the
last job's log file, whose last line must stay that job's own.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from . import sweep_folder

SWEEP_FAILED = 1  # some jobs of a sweep failed (the others wrote their summaries)
BAD_OUTPUT = 2  # as for any error in settings or inputs
RUN_FILES = ("summary.json", "history.jsonl")  # a folder holding one of these holds a run
CHECKPOINT = "checkpoint.json"  # federate/checkpoint.py's: beside history.jsonl, the run can be resumed
HYDRA_FILES = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "federate.log"}  # a job's own
created_for_run: dict[Path, Path] = {}  # run folder -> the topmost folder on_run_start created for it


def error(message: str, status: int) -> NoReturn:
    sys.stderr.write(f"[federate][ERROR] - {message}\n")
    sys.stderr.flush()
    sys.exit(status)


def info(message: str) -> None:
    sys.stderr.write(f"[federate][INFO] - {message}\n")
    sys.stderr.flush()


def check_output_folder(config: DictConfig, key: str) -> Path | None:
    """Exit with one line when the folder at `key` holds a run or cannot be created or written; else the
    topmost folder this call created (None if the folder existed)."""
    try:
        folder = OmegaConf.select(config, key, throw_on_resolution_failure=True)
    except Exception:  # an interpolation Hydra reports itself
        return None
    if not folder:
        return None
    path = Path(str(folder)).absolute()
    linked = [path] if path.is_symlink() else [p for p in hydra_paths(path, sweep=key == "hydra.sweep.dir")
                                                 if p.is_symlink()]
    if linked:  # Hydra would write the job's .hydra/ files and log through it
        error(f"{linked[0]} is a symbolic link; fedclip writes only into real folders: remove the link or set "
              f"{key}=<another folder>", BAD_OUTPUT)
    resumed = key == "hydra.sweep.dir" and sweep_folder.same_sweep(config)  # the same sweep, finished in place
    held = None if resumed else next(
        (p for name in RUN_FILES for p in ([path / name] if key == "hydra.run.dir" else path.rglob(name))
         if p.is_file() and not resumable(p)), None)
    if held:
        again = (f"; to finish the sweep it holds in place, run its own command again: "
                 f"{sweep_folder.sweep_command(path)}") if (path / sweep_folder.MULTIRUN_YAML).is_file() else ""
        error(f"{path} already holds a run ({held.relative_to(path)}); give this run its own folder "
              f"({key}=...) or move the old one away{again}", BAD_OUTPUT)
    if resumed:
        info(f"{path} holds a sweep of these overrides: finishing it in place (finished jobs are kept, an "
             "interrupted one resumes)")
    created = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        file = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{file} is a file, not a folder" if file else f"{e.strerror or e} ({e.filename or path})"
        error(f"cannot write the output folder {path}: {reason}; set {key}=<a folder you can write>", BAD_OUTPUT)
    return created


def hydra_paths(folder: Path, sweep: bool) -> list[Path]:
    """What Hydra writes into a run's folder (its .hydra/ files and the job's log), or into each job folder
    under a sweep's folder (the job folders themselves too, and the sweep's multirun.yaml)."""
    if not folder.is_dir():
        return []
    jobs = [p for p in folder.iterdir() if p.is_symlink() or p.is_dir()] if sweep else [folder]
    own = [folder / "multirun.yaml"] if sweep else []
    return own + [*(jobs if sweep else []),
                  *(j / name for j in jobs if not j.is_symlink() for name in (".hydra", *HYDRA_FILES))]


def resumable(run_file: Path) -> bool:
    """A single run's history beside its checkpoint: an interrupted run that this command may resume (the
    run itself refuses another config, federate/checkpoint.py). A finished run (summary.json) never is."""
    return run_file.name == "history.jsonl" and (run_file.parent / CHECKPOINT).is_file() \
        and not (run_file.parent / "summary.json").exists()


def remove_unused_run_folder(folder: Path) -> None:
    """Remove a single run's folder, and the parents made with it, when on_run_start created it and it holds
    only what Hydra wrote for the job (a refused run). Any other folder, or any other file, stays."""
    folder = Path(folder).absolute()
    top = created_for_run.pop(folder, None)
    if top is None or not folder.is_dir():
        return
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}
    if not files <= HYDRA_FILES:
        return
    for name in files:
        (folder / name).unlink()
    for d in (folder / ".hydra", folder, *folder.parents):
        if d.is_dir():
            try:
                d.rmdir()
            except OSError:  # not empty: something else lives there
                return
        if d == top:
            return


def job_folders(sweep_dir: Path) -> dict[Path, int]:
    """Hydra job folders under a sweep folder -> the time their .hydra/hydra.yaml was written (ns)."""
    if not sweep_dir.is_dir():
        return {}
    return {p.parent.parent: p.stat().st_mtime_ns for p in sweep_dir.rglob("hydra.yaml") if p.parent.name == ".hydra"}


def failed(job: Path) -> bool:
    """No summary.json, or one left by an earlier job in the same folder."""
    summary = job / "summary.json"
    return not summary.exists() or summary.stat().st_mtime_ns < (job / ".hydra" / "hydra.yaml").stat().st_mtime_ns


def overrides_of(job: Path) -> list[str]:
    try:
        return [str(o) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")]
    except Exception:
        return []


class FederateErrors(Callback):
    def __init__(self) -> None:
        self.before: dict[Path, int] = {}

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        created = check_output_folder(config, "hydra.run.dir")
        if created is not None:
            created_for_run[Path(str(config.hydra.run.dir)).absolute()] = created

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_output_folder(config, "hydra.sweep.dir")
        sweep_folder.current_sweep = Path(str(config.hydra.sweep.dir)).absolute()
        self.before = job_folders(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = sorted(j for j, t in job_folders(sweep_dir).items() if self.before.get(j) != t)
        bad = [j for j in jobs if failed(j)]
        if not bad:
            where = Path(sweep_dir).absolute()
            info(f"{len(jobs)} job{'s' * (len(jobs) != 1)} finished in {where}; report: python -m federate.report "
                 f"{where}")
            return
        overrides = {j: overrides_of(j) for j in jobs}
        common = set.intersection(*(set(o) for o in overrides.values())) if len(jobs) > 1 else set()
        points = {j: " ".join(o for o in overrides[j] if o not in common) for j in bad}  # what the sweep varied
        shown = "; ".join(f"{j} ({points[j]})" if points[j] else str(j) for j in bad[:10])
        more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
        error(f"{len(bad)} of {len(jobs)} jobs of the sweep failed (they wrote no summary.json): {shown}{more}; "
              f"the last line of each job's log says why, and python -m federate.report {sweep_dir} lists them",
              SWEEP_FAILED)
