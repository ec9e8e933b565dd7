"""python -m extract dataset=<name> [model=...] [key=value ...]  (config: conf/extract.yaml, typed by
extract/config.py)"""
import logging
import sys

import hydra
from omegaconf import DictConfig

from . import config  # noqa: F401  (registers the typed schema `extract_schema` before Hydra composes)
from .errors import ExtractError, describe_os_error
from .pipeline import run

log = logging.getLogger("extract")


@hydra.main(version_base="1.3", config_path="../conf", config_name="extract")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ExtractError as e:
        log.error("%s", e)
        sys.exit(2)
    except OSError as e:  # a file system error no step turned into a sentence: still one line
        log.error("%s", describe_os_error(e, "read or write a file"))
        sys.exit(2)


if __name__ == "__main__":
    from federate.cli import exit_on_bad_override

    exit_on_bad_override(("dataset", "model"), ("overwrite",), "extract")
    main()
