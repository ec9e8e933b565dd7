"""`python -m federate backend=flower`: the Flower apps in Flower's simulation engine, one SuperNode per
client (Flower sets each node's `partition-id` and `num-partitions`), in this process.

Flower 1.41 recommends `flwr run` for simulations, which starts a managed local SuperLink that keeps
running in the background, builds and installs the app as a FAB, and runs the ServerApp in another
process; this Python entry point stays in one process and returns the summary, so it keeps Flower's
`run_simulation` (deprecated there, still supported). `flwr run . <connection>` works as well (README).

Flower runs the ServerApp in a thread of its own and its simulation engine in the main thread, which is
where Ctrl-C and SIGTERM arrive. They stop the engine (and Ray); the ServerApp's thread then stops at its
next wait for replies, as the in-process rounds stop (federate/federation.py: one line saying how to
resume, the checkpoint of the last completed round on disk).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

from omegaconf import open_dict

from ..cache import load_cache
from ..errors import ConfigError
from ..experiment import target_and_participants
from ..federation import sigterm_as_interrupt
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
    # FLWR_LOG_LEVEL: read by Flower in each Ray actor at import; RAY_DISABLE_FAILURE_SIGNAL_HANDLER: no
    # C++ stack dump from Ray when SIGTERM stops the run (its one line says how to resume)
    set_env = [k for k in ("FLWR_LOG_LEVEL", "RAY_DISABLE_FAILURE_SIGNAL_HANDLER") if k not in os.environ]
    os.environ.update({k: {"FLWR_LOG_LEVEL": "ERROR"}.get(k, "1") for k in set_env})
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
        for k in set_env:
            del os.environ[k]
        for h in consoles:
            h.removeFilter(chatter)


def supernodes(cfg) -> int:
    """One SuperNode per client of the run: per participating domain, or per client of the partition or
    the split file."""
    header = load_cache(cfg.cache_file, cfg.model.name, domains=())
    _, participants = target_and_participants(list(header.all_domains), cfg.target_domain, header.path)
    if cfg.partition.name == "domain" and not cfg.split_file:
        return len(participants)
    return len(make_clients(load_cache(cfg.cache_file, cfg.model.name, domains=tuple(participants)), participants, cfg))


def run_simulation(cfg, cache_file: Path, output_dir: Path) -> dict:
    with quiet_console():
        return simulate(cfg, cache_file, output_dir)


def simulate(cfg, cache_file: Path, output_dir: Path) -> dict:
    try:
        from flwr.serverapp import Grid, ServerApp
        from flwr.simulation import run_simulation as flower_simulation

        from .client_app import app as client_app
        from .grid import PullingGrid
        from .server_app import serve
    except ImportError:
        raise ConfigError("backend=flower needs Flower's simulation engine: pip install -e '.[flower]'") from None
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.cache_file = str(cache_file)
    clients = supernodes(cfg)
    result, server_app = {}, ServerApp()
    stop = threading.Event()

    @server_app.main()
    def main(grid: Grid, context) -> None:
        result["thread"] = threading.current_thread()
        try:
            result["summary"] = serve(PullingGrid(grid, stop), cfg, output_dir, output_dir / "client_states")
        except BaseException as e:  # noqa: BLE001 (the main thread raises it: Flower would lose a KeyboardInterrupt)
            result["error"] = e

    try:
        with sigterm_as_interrupt():
            flower_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                              backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                              "init_args": {"num_cpus": 2, "include_dashboard": False}})
    except (KeyboardInterrupt, SystemExit) as e:
        # Ray's driver turns SIGTERM into sys.exit(SIGTERM) once it has started
        if isinstance(e, SystemExit) and e.code != signal.SIGTERM:
            raise
        stop.set()
        if "thread" not in result:
            raise KeyboardInterrupt from None
        result["thread"].join()  # the ServerApp's thread stops at its next wait for replies
        if "summary" in result:  # it had just finished: its outputs are complete
            return result["summary"]
        if isinstance(result.get("error"), KeyboardInterrupt):  # before the rounds: nothing to resume
            raise KeyboardInterrupt from None
        raise result["error"] from None  # Interrupted: the line that says how to resume
    if "error" in result:
        raise result["error"]
    if "summary" not in result:
        raise ConfigError("the Flower simulation ended without a result; see the log above")
    shutil.rmtree(output_dir / "client_states", ignore_errors=True)  # like the checkpoint, done with
    return result["summary"]
