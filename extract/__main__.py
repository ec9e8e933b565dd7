"""python -m extract dataset=<name> [model=...] [key=value ...]  (config: conf/extract.yaml, typed by
extract/config.py)"""
import logging
import sys

import hydra
from omegaconf import DictConfig

from federate.cli import CONF_DIR, error_line, exit_on_bad_override

from . import config  # noqa: F401  (registers the typed schema `extract_schema` before Hydra composes)
from .errors import ExtractError, describe_os_error
from .pipeline import run

log = logging.getLogger("extract")


INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C (128 + SIGINT)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="extract")
def extract_job(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ExtractError as e:
        log.error("%s", e)
        sys.exit(2)
    except OSError as e:  # a file system error no step turned into a sentence: still one line
        log.error("%s", describe_os_error(e, "read or write a file"))
        sys.exit(2)


def main() -> None:
    try:
        exit_on_bad_override(("dataset", "model"), ("overwrite",), "extract")
        extract_job()
    except KeyboardInterrupt as e:  # the pipeline says what was kept; earlier, nothing was written
        error_line("extract", f"interrupted (Ctrl-C){': ' + str(e) if str(e) else ''}")
        sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()
