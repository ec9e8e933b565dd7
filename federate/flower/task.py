"""What the Flower client and server apps share: the run's typed settings and a client's data."""
from __future__ import annotations

import json
import math
import os
import shlex
from functools import lru_cache
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..cache import load_cache
from ..cli import unknown_setting
from ..config import FederateConfig
from ..errors import ConfigError
from ..inputs import loads
from ..experiment import COUNTS, EXPLODED_RMS, class_text, make_client, pooled_embeddings, weight_rms
from ..partition import make_clients

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
MAX_SIZES_CHARS = 10_000  # {"train": n, "val": n, "test": n} is about 50


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
    return OmegaConf.merge(OmegaConf.structured(FederateConfig), loads(text))


def device_of(name: str) -> torch.device:
    """A client's device: the server's choice when this machine has it, else the CPU (sites differ)."""
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def client_data(cache_file: str, cfg, participants: list[str], node_config):
    """This node's client (federate.partition.make_clients, picked by the node config), class prompts and
    logit scale; kept across rounds, and read again when the cache file changes (a long-lived SuperNode
    serves many runs). With partition=domain only the client's own domain is read."""
    try:
        st = os.stat(cache_file)
        version = (st.st_mtime_ns, st.st_size)
    except OSError:
        version = None  # load_cache says what is wrong
    keys = {k: str(node_config[k]) for k in ("partition", "partition-id", "num-partitions") if k in node_config}
    return _client_data(cache_file, version, ship(cfg), json.dumps(participants), json.dumps(keys, sort_keys=True))


@lru_cache(maxsize=4)
def _client_data(cache_file: str, version, settings: str, participants: str, node: str):
    cfg, participants, node = unship(settings), json.loads(participants), json.loads(node)
    own_domain = cfg.partition.name == "domain" and not cfg.split_file  # (a split file may name any clients)
    if own_domain:  # one client per domain: this node's domain is all it reads
        participants = [domain_of_node(node, participants)]
    cache = load_cache(cache_file, cfg.model.name, domains=tuple(participants))
    clients = make_clients(cache, participants, cfg)
    split = clients[0] if own_domain else clients[client_index(node, [c.name for c in clients])]
    dev = device_of(cfg.device)
    return make_client(cache, split, pooled_embeddings(cache, dev)), class_text(cache, dev), cache.logit_scale, cache


def dtype_name(dtype: torch.dtype) -> str:
    """numpy's name of a torch dtype (what a Flower Array's header says): float32, float16, ..."""
    return str(dtype).removeprefix("torch.")


def check_update(arrays: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> str | None:
    """Why a client's (deserialised) update cannot be aggregated, or None when it can."""
    if set(arrays) != set(reference):
        return f"keys {sorted(arrays)} instead of {sorted(reference)}"
    for k, v in arrays.items():
        if v.shape != reference[k].shape:
            return f"{k} has shape {tuple(v.shape)} instead of {tuple(reference[k].shape)}"
        if v.dtype != reference[k].dtype:
            return f"{k} is {dtype_name(v.dtype)}, not {dtype_name(reference[k].dtype)}"
        if not torch.isfinite(v).all():
            return f"{k} has non-finite values"
        rms = weight_rms(k, float(torch.linalg.vector_norm(v.float())), v.numel())
        if rms > EXPLODED_RMS:  # what no client training at a sane lr sends (the run would stop, blaming lr)
            return f"{k} has exploded weights (root mean square {rms:.3g} > {EXPLODED_RMS:g})"
    return None


def check_counts(arrays: dict[str, torch.Tensor], train_rows: int) -> str | None:
    """Why a client's rows per class (keys ending in `.count`, which weigh its statistics where the server
    pools them: FedProto, CCVR, FedPFT) cannot be its own, or None: each a whole number >= 0, together no
    more than its training rows."""
    for k, v in arrays.items():
        if k.endswith(COUNTS):
            v = v.double()
            if bool((v < 0).any()) or bool(((v - v.round()).abs() > 1e-3).any()) or float(v.sum()) > train_rows + 1e-3:
                return (f"{k} is not rows per class of its {train_rows} training rows (whole numbers >= 0, at most "
                        "that many together)")
    return None


def check_arrays(record, reference: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with a reply's ArrayRecord, read from its headers before deserialising the data:
    the keys, dtypes (float32 for weights) and shapes of `reference` (what the method says a client sends)."""
    if not hasattr(record, "keys"):
        return "no adapter weights"
    if set(record.keys()) != set(reference):
        return f"keys {sorted(record.keys())} instead of {sorted(reference)}"
    for k, ref in reference.items():
        array = record[k]
        if str(getattr(array, "dtype", "")) != dtype_name(ref.dtype):
            return f"{k} is {getattr(array, 'dtype', '?')}, not {dtype_name(ref.dtype)}"
        if tuple(getattr(array, "shape", ())) != tuple(ref.shape):
            return f"{k} has shape {tuple(getattr(array, 'shape', ()))} instead of {tuple(ref.shape)}"
    return None


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_train_metrics(metrics, sizes: dict[str, int], loss: bool = True) -> str | None:
    """A training reply's metrics: `num-examples` a positive integer no larger than the client's training
    split (as it reported at the start), `train_loss` a finite number (with loss=False, under DP-SGD: none)."""
    n, value = metrics.get("num-examples"), metrics.get("train_loss")
    if not is_int(n) or not 1 <= n <= sizes["train"]:
        return f"num-examples {n!r} is not an integer between 1 and its {sizes['train']} training rows"
    if not loss:
        return None if value is None else "train_loss was sent, which privacy=dpsgd keeps on the client"
    if not is_number(value):
        return f"train_loss {value!r} is not a finite number"
    return None


def check_eval_metrics(metrics, sizes: dict[str, int]) -> str | None:
    """An evaluation reply's metrics: `val_acc` and `test_acc` finite numbers in [0, 1], each a number of
    correct rows over the split's size as the client reported it at the start."""
    for key, part in (("val_acc", "val"), ("test_acc", "test")):
        value = metrics.get(key)
        if not is_number(value) or not 0 <= value <= 1:
            return f"{key} {value!r} is not an accuracy in [0, 1]"
        hits = value * sizes[part]
        if abs(hits - round(hits)) > 1e-3:
            return f"{key} {value!r} is not a count of correct rows over its {sizes[part]} {part} rows"
    return None


def check_registration(config) -> tuple[str, str, dict] | str:
    """A query reply's (client, domain, split sizes), or why it is unusable (JSON nested too deeply for the
    parser, or longer than sizes can be, is one reason like any other)."""
    try:
        name, domain, text = str(config["client"]), str(config["domain"]), str(config["sizes"])
        if len(text) > MAX_SIZES_CHARS:
            raise ValueError(f"sizes is {len(text)} characters long")
        sizes = loads(text)
    except (KeyError, ValueError, TypeError) as e:
        return f"no usable client, domain and sizes ({e})"
    if not isinstance(sizes, dict) or not all(is_int(sizes.get(p)) and sizes[p] >= 1 for p in ("train", "val", "test")):
        return f"split sizes {sizes!r} are not positive integers for train, val and test"
    return name, domain, {p: int(sizes[p]) for p in ("train", "val", "test")}


def client_index(node_config, names: list[str]) -> int:
    """Which of the run's clients this SuperNode is: `partition` (a client name) or `partition-id` (an
    index, as Flower's simulation sets it, with `num-partitions`)."""
    if node_config.get("partition"):
        if str(node_config["partition"]) in names:
            return names.index(str(node_config["partition"]))
    elif "partition-id" in node_config and 0 <= int(node_config["partition-id"]) < len(names):
        if int(node_config.get("num-partitions", len(names))) == len(names):
            return int(node_config["partition-id"])
    raise ConfigError(f"this SuperNode has no client of this run: start it with --node-config \"partition='<client>'\" "
                      f"(one of {', '.join(names)}) or partition-id=<0..{len(names) - 1}> num-partitions={len(names)}")


def domain_of_node(node_config, participants: list[str]) -> str:
    return participants[client_index(node_config, participants)]
