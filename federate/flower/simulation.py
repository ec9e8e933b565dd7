"""`python -m federate backend=flower`: the Flower apps in Flower's simulation engine, one SuperNode per
client (Flower sets each node's `partition-id` and `num-partitions`), in this process.

Flower 1.41 recommends `flwr run` for simulations, which starts a managed local SuperLink that keeps
running in the background, builds and installs the app as a FAB, and runs the ServerApp in another
process; this Python entry point stays in one process and returns the summary, so it keeps Flower's
`run_simulation` (deprecated there, still supported). `flwr run . <connection>` works as well (README).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from omegaconf import open_dict

from ..cache import load_cache
from ..errors import ConfigError
from ..experiment import target_and_participants
from ..partition import make_clients


class FlowerChatter(logging.Filter):
    """Console only: alembic's set-up lines, Flower's debug lines and deprecation notice, and Python warnings
    (Ray's FutureWarning). The run's log file keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("alembic") or record.name == "py.warnings":
            return False
        return not (record.name.startswith("flwr") and (record.levelno < logging.WARNING or
                                                         "DEPRECATED FEATURE" in record.getMessage()))


@contextlib.contextmanager
def quiet_console():
    """Flower and Ray speak through the run's handlers only: Flower's own colored console handler is off (its
    records reach the log file and, filtered, the console), warnings become log records, and the Ray actors'
    Flower loggers print errors only."""
    consoles = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    chatter = FlowerChatter()
    for h in consoles:
        h.addFilter(chatter)
    set_env = "FLWR_LOG_LEVEL" not in os.environ
    if set_env:
        os.environ["FLWR_LOG_LEVEL"] = "ERROR"  # read by Flower in each Ray actor at import
    logging.captureWarnings(True)
    try:
        from flwr.common.logger import console_handler as flwr_console
    except ImportError:  # simulate() says what to install
        flwr_console = None
    level = flwr_console.level if flwr_console else None
    try:
        if flwr_console:
            flwr_console.setLevel(logging.CRITICAL + 1)
        yield
    finally:
        if flwr_console:
            flwr_console.setLevel(level)
        logging.captureWarnings(False)
        if set_env:
            del os.environ["FLWR_LOG_LEVEL"]
        for h in consoles:
            h.removeFilter(chatter)


def run_simulation(cfg, cache_file: Path, output_dir: Path) -> dict:
    with quiet_console():
        return simulate(cfg, cache_file, output_dir)


def simulate(cfg, cache_file: Path, output_dir: Path) -> dict:
    try:
        from flwr.serverapp import Grid, ServerApp
        from flwr.simulation import run_simulation as flower_simulation

        from .client_app import app as client_app
        from .server_app import serve
    except ImportError:
        raise ConfigError("backend=flower needs Flower's simulation engine: pip install -e '.[flower]'") from None
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.cache_file = str(cache_file)
    header = load_cache(cfg.cache_file, cfg.model.name, domains=())
    _, participants = target_and_participants(list(header.all_domains), cfg.target_domain, header.path)
    clients = len(participants) if cfg.partition.name == "domain" else \
        len(make_clients(load_cache(cfg.cache_file, cfg.model.name, domains=tuple(participants)), participants, cfg))
    result, server_app = {}, ServerApp()

    @server_app.main()
    def main(grid: Grid, context) -> None:
        result.update(serve(grid, cfg, output_dir))

    flower_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                      backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                      "init_args": {"num_cpus": 2, "include_dashboard": False}})
    if not result:
        raise ConfigError("the Flower simulation ended without a result; see the log above")
    return result
