"""python -m federate [key=value ...]  (config: conf/federate.yaml)"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .errors import ConfigError
from .run import run

log = logging.getLogger("federate")


@hydra.main(version_base="1.3", config_path="../conf", config_name="federate")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg, HydraConfig.get().runtime.output_dir)["overall"]
    except ConfigError as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
