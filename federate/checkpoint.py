"""A run's checkpoint: what the next round needs, written after every round so that a killed run resumes.

Files in the run's folder, each written to a temporary name and renamed (a kill never leaves a half
file): `checkpoint-<0|1>.safetensors` (tensors: the shared state, the personal states, the strategy's
moments, the selected round's states; rounds alternate between the two names) and `checkpoint.json`
(the round, the selected round's record, the config, what the run computed on, the sha256 of its tensors
file and of its own record). The JSON moves last and its tensors file is never the one being written, so
a kill at any moment leaves the last completed round resumable. All are removed once the run has
written its summary.

Nothing in a checkpoint is trusted: `load` verifies both checksums, and `Federation` verifies every field
and tensor against the run it resumes (`check_record`, `check_tensors`); anything else is "the checkpoint
is damaged", in one line that says how to start over.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from extract.files import atomic_path

from .errors import ConfigError

JSON = "checkpoint.json"
FORMAT = 2  # 2: shared/personal states and checksums (fedclip before methods as algorithms wrote 1, unversioned)
MAX_JSON = 64 << 20  # bytes: a checkpoint record is a few kB (the selected round's row)


class Damaged(ConfigError):
    def __init__(self, output_dir: Path, why: str):
        super().__init__(f"the checkpoint in {output_dir} is damaged ({why}); remove {output_dir}/checkpoint* to "
                         "start the run over")


def _tensors_name(round_: int) -> str:
    return f"checkpoint-{round_ % 2}.safetensors"  # two alternating files: the JSON's one is never replaced


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record_sha256(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def save(output_dir: Path, round_: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    name = _tensors_name(round_)
    with atomic_path(output_dir / name) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        digest = _sha256(tmp)
    record = {**meta, "format": FORMAT, "round": round_, "tensors": name, "tensors_sha256": digest}
    with atomic_path(output_dir / JSON) as tmp:
        tmp.write_text(json.dumps({**record, "record_sha256": _record_sha256(record)}))


def load(output_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The folder's checkpoint (meta, tensors), its checksums verified."""
    path = output_dir / JSON
    try:
        if path.is_symlink() or not path.is_file():
            raise Damaged(output_dir, f"{JSON} is not a regular file")
        if path.stat().st_size > MAX_JSON:
            raise Damaged(output_dir, f"{JSON} is {path.stat().st_size} bytes")
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise Damaged(output_dir, f"{JSON} holds no record")
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{output_dir} holds a checkpoint of an older fedclip, which this one cannot resume; "
                              f"remove {output_dir}/checkpoint* to start the run over")
        record = {k: v for k, v in meta.items() if k != "record_sha256"}
        if meta.get("record_sha256") != _record_sha256(record):
            raise Damaged(output_dir, f"{JSON} does not match its checksum")
        name = meta.get("tensors")
        if name not in (_tensors_name(0), _tensors_name(1)):
            raise Damaged(output_dir, f"it names the tensors file {name!r}")
        tensors_path = output_dir / name
        if tensors_path.is_symlink() or not tensors_path.is_file() or _sha256(tensors_path) != meta.get("tensors_sha256"):
            raise Damaged(output_dir, f"{name} is missing or does not match its checksum")
        return meta, load_file(str(tensors_path))
    except (ValueError, RecursionError, SafetensorError, OSError) as e:
        if isinstance(e, ConfigError):
            raise
        raise Damaged(output_dir, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None


def check_record(output_dir: Path, meta: dict, rounds: int, clients: list[str]) -> None:
    """Every field of a checkpoint record is what a run of `rounds` over `clients` writes."""
    def bad(why):
        raise Damaged(output_dir, why)

    r = meta.get("round")
    if not is_int(r) or not 0 <= r <= rounds:
        bad(f"round {r!r} is not a round from 0 to {rounds}")
    if not isinstance(meta.get("config"), dict):
        bad("it records no config")
    if not isinstance(meta.get("best_is_current"), bool):
        bad("best_is_current is not true or false")
    dropped = meta.get("dropped")
    if not isinstance(dropped, dict) or not all(c in clients and isinstance(w, str) for c, w in dropped.items()):
        bad("its dropped clients are not clients of this run")
    row, score = meta.get("best_row"), meta.get("best_score")
    if row is None:
        if r != 0 or score != -math.inf and score is not None:
            bad("no round is selected after a completed round")
        return
    if not isinstance(row, dict) or not is_int(row.get("round")) or not 0 <= row["round"] <= r:
        bad(f"the selected round {row.get('round') if isinstance(row, dict) else row!r} is not a completed round")
    if not is_number(score):
        bad(f"the selection score {score!r} is not a finite number")
    for key in ("val_mean", "val_rows", "target_acc"):
        if key in row and row[key] is not None and not accuracy(row[key]):
            bad(f"the selected round's {key} {row[key]!r} is not an accuracy in [0, 1]")
    for key in ("val_acc", "test_acc"):
        values = row.get(key, {})
        if not isinstance(values, dict) or not set(values) <= set(clients) or not all(map(accuracy, values.values())):
            bad(f"the selected round's {key} is not an accuracy in [0, 1] for clients of this run")
    if meta["best_is_current"] != (row["round"] == r):
        bad("best_is_current does not say whether the selected round is the last one")


def check_tensors(output_dir: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                  optional: tuple[str, ...] = ()) -> None:
    """The tensors are exactly the `expected` keys (and any under the `optional` prefixes, which must
    still have a known shape: `expected` gives them by their key less the prefix), of their shapes and
    dtypes, and finite."""
    for k, v in tensors.items():
        prefix = next((p for p in optional if k.startswith(p)), None)
        like = expected.get(k) if prefix is None else expected.get(f"global/{k[len(prefix):]}")
        if like is None:
            raise Damaged(output_dir, f"it holds a tensor {k!r} this run does not have")
        if v.shape != like.shape or v.dtype != like.dtype:
            raise Damaged(output_dir, f"{k} is {v.dtype} {tuple(v.shape)}, not {like.dtype} {tuple(like.shape)}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise Damaged(output_dir, f"{k} has values that are not finite")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise Damaged(output_dir, f"it lacks {missing[0]}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def accuracy(value) -> bool:
    return is_number(value) and 0 <= value <= 1


def remove(output_dir: Path) -> None:
    for name in (JSON, _tensors_name(0), _tensors_name(1)):
        (output_dir / name).unlink(missing_ok=True)


def exists(output_dir: Path) -> bool:
    return (output_dir / JSON).exists() or (output_dir / JSON).is_symlink()


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
