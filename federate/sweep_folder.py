"""A sweep's folder, finished in place: `python -m federate -m ... hydra.sweep.dir=<folder>` run again with the
same overrides resumes an interrupted sweep. Hydra numbers the jobs of the same overrides the same way, so
each job finds its own folder: a finished run of the same config is kept (`finished_run`), an interrupted one
resumes from its checkpoint (federate/federation.py), the others run.

- `same_sweep`: whether a sweep folder was made by the same overrides (its multirun.yaml), so that
  federate.callbacks lets the sweep into it instead of refusing a folder that holds runs;
- `sweep_command`: the command that finishes a sweep in place (said on Ctrl-C);
- `planned_jobs`: how many jobs a sweep folder's multirun.yaml plans (the report's "N of M jobs").
"""
from __future__ import annotations

import json
import logging
import os
import shlex
from collections import OrderedDict
from pathlib import Path

from omegaconf import OmegaConf

from .inputs import MiB, loads, read_bytes, read_text

log = logging.getLogger("federate")
MULTIRUN_YAML = "multirun.yaml"  # Hydra's record of a sweep, in its folder
current_sweep: Path | None = None  # the folder of the sweep this process runs (for a Ctrl-C between jobs)


def finished_summary(output_dir: Path, cfg) -> dict | None:
    """The summary of a finished run of the config `cfg` in `output_dir`, or None: no finished run, or one of
    another config (which the run refuses as before)."""
    path = Path(output_dir) / "summary.json"
    if not path.is_file() or path.is_symlink():
        return None
    try:
        summary = loads(read_bytes(path, 64 * MiB))
        current = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg)
                                        else dict(cfg)))
    except (OSError, ValueError, TypeError):
        return None
    return summary if isinstance(summary, dict) and summary.get("config") == current else None


def finished_run(output_dir: Path, cfg) -> dict | None:
    """`finished_summary`, logged as kept and stamped as written now (so that the sweep counts it as one of
    its finished jobs)."""
    summary = finished_summary(output_dir, cfg)
    if summary is None:
        return None
    os.utime(Path(output_dir) / "summary.json")
    log.info("kept %s: it holds a finished run of this config (summary.json); overall %.2f%%", output_dir,
             100 * float(summary.get("overall") or 0))
    return summary


def task_overrides(sweep_dir: Path) -> list[str] | None:
    """The task overrides of the sweep recorded in `<sweep_dir>/multirun.yaml`, or None."""
    try:
        config = OmegaConf.create(read_text(Path(sweep_dir) / MULTIRUN_YAML, MiB))
        return [str(o) for o in config.hydra.overrides.task]
    except Exception:  # missing, unreadable or not Hydra's
        return None


def same_sweep(config) -> bool:
    """Whether the sweep of `config` (a sweep's Hydra config) is the one recorded in its folder: the same
    task overrides."""
    recorded = task_overrides(Path(str(config.hydra.sweep.dir)))
    return recorded is not None and sorted(recorded) == sorted(str(o) for o in config.hydra.overrides.task)


def sweep_command(sweep_dir: Path) -> str:
    """The command that finishes the sweep in `sweep_dir` in place: its overrides and its folder."""
    sweep_dir = Path(sweep_dir).absolute()
    try:
        config = OmegaConf.create(read_text(sweep_dir / MULTIRUN_YAML, MiB))
        hydra = [str(o) for o in config.hydra.overrides.hydra
                 if not str(o).startswith(("hydra.sweep.dir=", "hydra.mode="))]
        task = [str(o) for o in config.hydra.overrides.task]
    except Exception:
        return f"the same command with hydra.sweep.dir={sweep_dir}"
    args = ["python", "-m", "federate", "-m", *hydra, *task, f"hydra.sweep.dir={sweep_dir}"]
    return " ".join(shlex.quote(a) for a in args)


def planned_jobs(sweep_dir: Path) -> int | None:
    """The number of jobs the sweep recorded in `sweep_dir` plans: the product of the number of values of each
    swept setting (hydra.sweeper.params, then the command line's, which win), as Hydra's basic sweeper
    expands them; None when multirun.yaml cannot tell (no file, a glob sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        config = OmegaConf.create(read_text(Path(sweep_dir) / MULTIRUN_YAML, MiB))
        params = config.hydra.sweeper.get("params")
        params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
        lines = [f"{k}={v}" for k, v in params.items()] + [str(o) for o in config.hydra.overrides.task]
        counts: dict[str, int] = OrderedDict()
        for o in OverridesParser.create().parse_overrides(lines):
            counts[o.key_or_group] = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
    except Exception:  # noqa: BLE001 - a sweep the report cannot count: it says so
        return None
    total = 1
    for n in counts.values():
        total *= n
    return total
