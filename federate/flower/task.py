"""What the Flower client and server apps share: the run's typed settings and a client's data."""
from __future__ import annotations

import json
import os
import shlex
from functools import lru_cache
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .. import adapters, methods
from ..cache import load_cache
from ..cli import unknown_setting
from ..config import FederateConfig
from ..errors import ConfigError
from ..experiment import class_text, make_client
from ..partition import ClientSplit
from ..splits import read_split_file, split_indices

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def settings_from_run_config(run_config: dict) -> tuple[DictConfig, Path]:
    """`flwr run`: the federate config (conf/federate.yaml, typed by its schema) with the run config's
    `overrides` (Hydra overrides, as on the command line of `python -m federate`), and its `output_dir`."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        overrides = shlex.split(str(run_config.get("overrides", "")))
        if unknown := unknown_setting(overrides, "federate"):  # Hydra would add it, and nothing would read it
            raise ConfigError(f"bad run config overrides ({unknown})")
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="federate", overrides=overrides)
    except (ValueError, HydraException, OmegaConfBaseException) as e:
        why = f"{e}: {e.__cause__}" if e.__cause__ else str(e)
        raise ConfigError(f"bad run config overrides ({' '.join(why.split())})") from None
    return cfg, Path(str(run_config.get("output_dir", "outputs/flower")))


def ship(cfg) -> str:
    """The settings that travel with every message (so a client needs no configuration but its data)."""
    return json.dumps(OmegaConf.to_container(cfg, resolve=True))


def unship(text: str) -> DictConfig:
    """The typed settings back from a message."""
    return OmegaConf.merge(OmegaConf.structured(FederateConfig), json.loads(text))


def device_of(name: str) -> torch.device:
    """A client's device: the server's choice when this machine has it, else the CPU (sites differ)."""
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def client_data(cache_file: str, model_name: str, domain: str, seed: int, split_file: str, device: str):
    """This client's splits (only its domain is read), class prompts and logit scale; kept across rounds,
    and read again when the cache file changes (a long-lived SuperNode serves many runs)."""
    try:
        st = os.stat(cache_file)
        version = (st.st_mtime_ns, st.st_size)
    except OSError:
        version = None  # load_cache says what is wrong
    return _client_data(cache_file, version, model_name, domain, seed, split_file, device)


@lru_cache(maxsize=2)
def _client_data(cache_file: str, version, model_name: str, domain: str, seed: int, split_file: str, device: str):
    cache = load_cache(cache_file, model_name, domains=(domain,))
    ids = {domain: cache.domains[domain].ids}
    rows = read_split_file(split_file, ids, [domain]) if split_file else {domain: split_indices(len(ids[domain]), seed, domain)}
    dev = device_of(device)
    return make_client(cache, ClientSplit(domain, domain, rows[domain]), dev), class_text(cache, dev), cache.logit_scale


def client_adapter(cfg, cache_file: str, domain: str) -> adapters.Adapter:
    adapter = adapters.build(cfg.adapter, text_tower=cfg.text_adapter)
    adapter.prepare(load_cache(cache_file, cfg.model.name, domains=(domain,)), cfg.model)  # read once, kept
    return adapter


def client_method(cfg) -> methods.Method:
    return methods.get(cfg.method.name)


def check_update(arrays: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> str | None:
    """Why a client's update cannot be aggregated, or None when it can."""
    if set(arrays) != set(reference):
        return f"keys {sorted(arrays)} instead of {sorted(reference)}"
    for k, v in arrays.items():
        if v.shape != reference[k].shape:
            return f"{k} has shape {tuple(v.shape)} instead of {tuple(reference[k].shape)}"
        if not torch.isfinite(v).all():
            return f"{k} has non-finite values"
    return None


def domain_of_node(node_config, participants: list[str]) -> str:
    if node_config.get("partition"):
        return str(node_config["partition"])
    if "partition-id" in node_config and 0 <= int(node_config["partition-id"]) < len(participants):
        return participants[int(node_config["partition-id"])]
    raise ConfigError(f"this SuperNode has no domain: start it with --node-config \"partition='<domain>'\" "
                      f"(one of {', '.join(participants)})")
