"""`python -m federate backend=flower`: the Flower apps in Flower's simulation engine, one SuperNode per
client (Flower sets each node's `partition-id` and `num-partitions`), in this process.

Flower 1.41 recommends `flwr run` for simulations, which starts a managed local SuperLink that keeps
running in the background, builds and installs the app as a FAB, and runs the ServerApp in another
process; this Python entry point stays in one process and returns the summary, so it keeps Flower's
`run_simulation` (deprecated there, still supported). `flwr run . <connection>` works as well (README).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import open_dict

from ..cache import load_cache
from ..errors import ConfigError
from ..experiment import target_and_participants
from ..partition import make_clients


def run_simulation(cfg, cache_file: Path, output_dir: Path) -> dict:
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
