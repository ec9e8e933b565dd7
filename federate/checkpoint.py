"""A run's checkpoint: what the next round needs, written after every round so that a killed run resumes.

Files in the run's folder, each written to a temporary name and renamed (a kill never leaves a half
file): `checkpoint-<0|1>.safetensors` (tensors: the global adapter, the strategy's moments, personal
adapters, the selected round's adapters; rounds alternate between the two names) and `checkpoint.json`
(the round, the selected round's record, the config, and the name of its tensors file). The
JSON moves last and its tensors file is never the one being written, so a kill at any moment leaves the
last completed round resumable. All are removed once the run has written its summary.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ConfigError

JSON = "checkpoint.json"


def _tensors_name(round_: int) -> str:
    return f"checkpoint-{round_ % 2}.safetensors"  # two alternating files: the JSON's one is never replaced


def save(output_dir: Path, round_: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    name = _tensors_name(round_)
    tmp = output_dir / f".{name}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, output_dir / name)
    tmp_json = output_dir / f".{JSON}.tmp"
    tmp_json.write_text(json.dumps({**meta, "round": round_, "tensors": name}))
    os.replace(tmp_json, output_dir / JSON)


def load(output_dir: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The last complete checkpoint in the folder (meta, tensors), or None when there is none."""
    path = output_dir / JSON
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
        return meta, load_file(str(output_dir / meta["tensors"]))
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ConfigError(f"{path} is not a checkpoint this tool can resume from ({e}); move the folder away "
                          "and start the run again") from None


def remove(output_dir: Path) -> None:
    for name in (JSON, _tensors_name(0), _tensors_name(1)):
        (output_dir / name).unlink(missing_ok=True)


def exists(output_dir: Path) -> bool:
    return (output_dir / JSON).exists()


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config containers."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b, name = saved.get(key), current.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}={json.dumps(b)} (was {json.dumps(a)})")
    return out
