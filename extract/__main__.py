"""python -m extract dataset=<name> [model=...] [key=value ...]  (config: conf/extract.yaml)"""
import logging
import sys

import hydra
from omegaconf import DictConfig

from .errors import ExtractError
from .pipeline import run

log = logging.getLogger("extract")


@hydra.main(version_base="1.3", config_path="../conf", config_name="extract")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ExtractError as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
