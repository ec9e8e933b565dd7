"""The exact `python -m extract ...` command a message suggests, built from the user's own settings.

Under Hydra the user's overrides of the keys extract shares with federate (`dataset`, `dataset.*`, `model`,
`model.*`, `cache_dir`, `cache_file`) are repeated as given, so `model=tiny_random cache_dir=/tmp/c`
stays in the suggestion; the config group picked for `dataset` is always named. Called in-process (no
Hydra run), the command is rebuilt from the config's values.
"""
from __future__ import annotations

import shlex

SHARED_KEYS = ("dataset", "model", "cache_dir", "cache_file")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _shared(key: str) -> bool:
    return key in SHARED_KEYS or key.startswith(("dataset.", "model."))


def _hydra_overrides():
    """(task overrides, chosen dataset group) of the current Hydra run, or None outside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return list(hc.overrides.task), hc.runtime.choices.get("dataset")


def _from_config(cfg) -> list[str]:
    ds = cfg.dataset
    root = ds.get("root") if not _missing(ds, "root") else None
    args = [f"dataset={ds.get('name') or 'folder'}"]
    if root:
        args.append(f"dataset.root={root}")
    if cfg.model.get("name"):
        args.append(f"model.name={cfg.model.name}")
    if cfg.get("cache_file"):
        args.append(f"cache_file={cfg.cache_file}")
    elif cfg.get("cache_dir"):
        args.append(f"cache_dir={cfg.cache_dir}")
    return args


def _missing(node, key: str) -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.is_missing(node, key)


def extract_command(cfg, **changes) -> str:
    """`python -m extract` with the user's dataset, model and cache settings, then `changes` (key=value,
    `dataset__root` for `dataset.root`) replacing or adding settings. A dataset read from a folder whose
    folder is not set gets `dataset.root=/path/to/<its name>`."""
    hydra = _hydra_overrides()
    if hydra is None:
        args = _from_config(cfg)
    else:
        overrides, dataset_group = hydra
        args = [o for o in overrides if _shared(_key(o))]
        if dataset_group and not any(_key(o) == "dataset" for o in args):
            args.insert(0, f"dataset={dataset_group}")
    ds = cfg.dataset
    if not (ds.get("hub_id") or ds.get("root") or ds.get("generate")) and "dataset__root" not in changes:
        changes["dataset__root"] = f"/path/to/{ds.get('name') or 'dataset'}"  # a folder dataset needs its folder
    for key, value in changes.items():
        key = key.replace("__", ".")
        args = [a for a in args if _key(a) != key] + [f"{key}={value}"]
    return "python -m extract " + " ".join(shlex.quote(a) for a in args)
