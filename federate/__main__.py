"""python -m federate [key=value ...]  (config: conf/federate.yaml)

An error in the settings, the inputs or an output path is one line, without a traceback. A single run
then exits with status 2. A job of a sweep (-m) logs its error (the last line of its log file), writes no
summary.json and returns, so the later points still run; federate.callbacks.FederateErrors (hydra.callbacks)
names the failed jobs at the end and exits with status 1. Ctrl-C is one line too, with status 130; in a sweep
it names the command that finishes the whole sweep in place (federate/sweep_folder.py).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from extract.files import UnsafePath

from . import sweep_folder
from .callbacks import remove_unused_run_folder
from .cli import CONF_DIR, GROUPS, error_line, exit_on_bad_override
from .errors import ConfigError
from .federation import Interrupted
from .run import run

log = logging.getLogger("federate")
INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C (128 + SIGINT)


def os_error_message(e: OSError, output_dir: str) -> str:
    """One line for a file that could not be read or written, with what to do about it."""
    reason = e.strerror or str(e) or type(e).__name__
    path = e.filename
    if path is None:
        return f"{reason} ({type(e).__name__}; this run writes to {output_dir})"
    path = os.path.abspath(os.fsdecode(path))
    out = os.path.abspath(output_dir)
    if os.path.commonpath([path, out]) in (path, out):  # the output folder, a file in it or a parent of it
        return (f"cannot write {path}: {reason}; the run's output folder {out} must be writable: set "
                f"hydra.run.dir=<a folder you can write> (hydra.sweep.dir=... with -m)")
    also = f" and {os.fsdecode(e.filename2)}" if e.filename2 else ""
    return f"cannot access {path}{also}: {reason}; check that the path exists and that you may read and write it"


def one_line(message: str) -> str:
    return " ".join(message.split()) if "\n" in message else message


def interrupted_message(output_dir: str | None) -> str:
    """What Ctrl-C outside the rounds leaves behind, in one line (during the rounds, federate.federation
    says how to resume); in a sweep, how to finish the whole sweep."""
    where = f": {output_dir} holds an unfinished run (no summary.json)" if output_dir else ""
    return f"interrupted (Ctrl-C){where}{sweep_resume()}"


def sweep_resume() -> str:
    """"; finish the sweep ... with: <command>" while a sweep runs in this process, else ""."""
    if sweep_folder.current_sweep is None:
        return ""
    return (f"; finish the whole sweep in place (its finished jobs are kept, the interrupted one resumes) with: "
            f"{sweep_folder.sweep_command(sweep_folder.current_sweep)}")


def in_sweep_message(e: Exception, output_dir: str) -> str:
    """The rounds' Ctrl-C message for a job of a sweep: where it stopped, and the sweep's command."""
    stopped = str(e).split("; resume with:")[0]
    return f"{stopped} in {output_dir}{sweep_resume()}"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="federate")
def federate_job(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    output_dir = hydra_cfg.runtime.output_dir
    if hydra_cfg.mode == RunMode.MULTIRUN:  # (also in a launcher's worker process)
        sweep_folder.current_sweep = Path(str(hydra_cfg.sweep.dir)).absolute()
    try:
        return run(cfg, output_dir)["overall"]
    except Interrupted as e:  # during the rounds: the checkpoint is on disk
        log.error("%s", in_sweep_message(e, output_dir) if sweep_folder.current_sweep is not None else e)
        sys.exit(INTERRUPTED)
    except (ConfigError, UnsafePath) as e:
        message = str(e)
    except OSError as e:
        message = os_error_message(e, output_dir)
    except KeyboardInterrupt:
        log.error("%s", interrupted_message(output_dir))
        sys.exit(INTERRUPTED)
    log.error("%s", one_line(message))
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return None  # the sweep goes on; the job folder without summary.json marks the failure
    remove_unused_run_folder(Path(output_dir))  # refused before writing anything: no empty run folder stays
    sys.exit(2)


def main() -> None:
    """The command line's entry point; a script that registers its own adapters calls it (README)."""
    try:
        exit_on_bad_override((*GROUPS, "experiment"), ("text_adapter",), "federate")
        federate_job()
    except KeyboardInterrupt:  # before or after a run: nothing of it is unfinished
        error_line("federate", interrupted_message(None))
        sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()
