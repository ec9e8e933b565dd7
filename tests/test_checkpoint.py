"""A checkpoint is verified before a run resumes from it: its checksums, every field and tensor, and what the
run computed on (the cache and the splits); anything else is refused in one line."""
from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
from conftest import PLANTED_SIZES, outputs, run_federate, same_outputs
from planted import one_line, planted, write_cache
from safetensors.torch import load_file, save_file

from federate import checkpoint
from federate.errors import ConfigError
from federate.federation import Interrupted
from federate.run import CachedBackend


@pytest.fixture
def stopped(planted_cache, tmp_path, monkeypatch):
    """A fedavgm run (strategy moments in its checkpoint) stopped after round 2 of 4; its folder."""
    train = CachedBackend.train
    monkeypatch.setattr(CachedBackend, "train", lambda self, fed, r, s: (_ for _ in ()).throw(KeyboardInterrupt)
                        if r == 3 else train(self, fed, r, s))
    with pytest.raises(Interrupted):
        run_federate(planted_cache, tmp_path / "run", "strategy=fedavgm", rounds=4)
    monkeypatch.setattr(CachedBackend, "train", train)
    return tmp_path / "run"


def resume(cache, folder, *overrides):
    return run_federate(cache, folder, "strategy=fedavgm", *overrides, rounds=4)


def rewrite_record(folder, edit):
    """Change checkpoint.json's record and give it a matching checksum (what a careful forger would do)."""
    path = folder / "checkpoint.json"
    meta = json.loads(path.read_text())
    meta.pop("record_sha256")
    edit(meta)
    meta["record_sha256"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    path.write_text(json.dumps(meta))


def rewrite_tensors(folder, edit):
    """Change the checkpoint's tensors and record their new checksum."""
    meta = json.loads((folder / "checkpoint.json").read_text())
    path = folder / meta["tensors"]
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    rewrite_record(folder, lambda m: m.update(tensors_sha256=hashlib.sha256(path.read_bytes()).hexdigest()))


def test_an_untouched_checkpoint_resumes_to_the_same_outputs(planted_cache, stopped, tmp_path):
    resume(planted_cache, stopped)
    run_federate(planted_cache, tmp_path / "whole", "strategy=fedavgm", rounds=4)
    same_outputs(outputs(stopped), outputs(tmp_path / "whole"))


@pytest.mark.parametrize("edit, why", [
    (lambda m: m.update(round=-3), "round -3 is not a round from 0 to 4"),
    (lambda m: m.update(round=2.5), "round 2.5 is not a round from 0 to 4"),
    (lambda m: m.update(round=True), "round True is not a round"),
    (lambda m: m["best_row"].update(val_mean=7.0), "val_mean 7.0 is not an accuracy in [0, 1]"),
    (lambda m: m["best_row"]["test_acc"].update(alpha=float("nan")), "test_acc is not an accuracy"),
    (lambda m: m["best_row"].update(round=9), "the selected round 9 is not a completed round"),
    (lambda m: m.update(best_score=math.inf), "the selection score inf is not a finite number"),
    (lambda m: m.update(dropped={"intruder": "gone"}), "its dropped clients are not clients of this run"),
    (lambda m: m.update(best_is_current="yes"), "best_is_current is not true or false"),
    (lambda m: m.update(tensors="../../etc/passwd"), "it names the tensors file '../../etc/passwd'"),
])
def test_a_forged_record_is_damaged(planted_cache, stopped, edit, why):
    rewrite_record(stopped, edit)
    line = one_line(ConfigError, lambda: resume(planted_cache, stopped), "is damaged", why, "checkpoint* to start")
    assert "lr" not in line  # never blamed on the settings


@pytest.mark.parametrize("edit, why", [
    (lambda t: t["global/image.0.weight"].fill_(float("nan")), "global/image.0.weight has values that are not finite"),
    (lambda t: t.update({"global/image.0.weight": t["global/image.0.weight"][:3]}), "is torch.float32 (3, 64)"),
    (lambda t: t.update({"global/image.0.weight": t["global/image.0.weight"].double()}), "torch.float64"),
    (lambda t: [t.pop(k) for k in ("strategy/velocity/image.2.bias", "global/image.2.bias")], "it lacks global/image.2.bias"),
    (lambda t: t.update({"personal/head.weight": t["global/image.0.bias"].clone()}), "'personal/head.weight' this run does not"),
])
def test_forged_tensors_are_damaged(planted_cache, stopped, edit, why):
    rewrite_tensors(stopped, edit)
    one_line(ConfigError, lambda: resume(planted_cache, stopped), "is damaged", why)


@pytest.mark.parametrize("damage", ["json", "tensors", "truncate", "garbage", "nested"])
def test_a_damaged_file_is_one_line(planted_cache, stopped, damage):
    meta = json.loads((stopped / "checkpoint.json").read_text())
    if damage == "json":
        (stopped / "checkpoint.json").write_text(json.dumps({**meta, "round": 1}))  # checksum not updated
    elif damage == "tensors":
        data = bytearray((stopped / meta["tensors"]).read_bytes())
        data[-1] ^= 1
        (stopped / meta["tensors"]).write_bytes(bytes(data))
    elif damage == "truncate":
        (stopped / meta["tensors"]).write_bytes((stopped / meta["tensors"]).read_bytes()[:100])
    elif damage == "garbage":
        (stopped / "checkpoint.json").write_bytes(b"\xff\x00not json")
    else:
        (stopped / "checkpoint.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line(ConfigError, lambda: resume(planted_cache, stopped), "is damaged", "checkpoint* to start")


def stop_at(round_, monkeypatch):
    train = CachedBackend.train
    monkeypatch.setattr(CachedBackend, "train", lambda self, fed, r, s: (_ for _ in ()).throw(KeyboardInterrupt)
                        if r == round_ else train(self, fed, r, s))
    return lambda: monkeypatch.setattr(CachedBackend, "train", train)


def test_a_resume_on_a_rebuilt_cache_is_refused(planted_cache, tmp_path, monkeypatch):
    cache = tmp_path / "cache.h5"
    shutil.copy(planted_cache, cache)
    undo = stop_at(2, monkeypatch)
    with pytest.raises(Interrupted):
        run_federate(cache, tmp_path / "run", rounds=3)
    undo()
    domains, text = planted(PLANTED_SIZES, seed=1)  # rebuilt at the same path: other embeddings
    write_cache(cache, domains, text)
    one_line(ConfigError, lambda: run_federate(cache, tmp_path / "run", rounds=3),
             "holds an unfinished run on other inputs", "cache_checksums")


def test_a_resume_on_a_changed_split_file_is_refused(planted_cache, tmp_path, monkeypatch):
    first = tmp_path / "first"
    run_federate(planted_cache, first, rounds=1)
    splits = json.loads((first / "splits.json").read_text())
    split_file = tmp_path / "splits.json"
    split_file.write_text(json.dumps(splits))
    undo = stop_at(2, monkeypatch)
    with pytest.raises(Interrupted):
        run_federate(planted_cache, tmp_path / "run", f"split_file={split_file}", rounds=3)
    undo()
    a = splits["alpha"]
    a["train"][0], a["test"][0] = a["test"][0], a["train"][0]  # a test row becomes a training row
    split_file.write_text(json.dumps(splits))
    one_line(ConfigError, lambda: run_federate(planted_cache, tmp_path / "run", f"split_file={split_file}", rounds=3),
             "holds an unfinished run on other inputs", "splits_sha256")


def test_a_run_killed_before_its_first_round_is_recorded_runs_again_in_its_folder(planted_cache, tmp_path):
    (tmp_path / "history.jsonl").write_text("")  # killed the moment history.jsonl appeared (older fedclip)
    s = run_federate(planted_cache, tmp_path, rounds=2)
    assert s["best_round"] >= 1 and len((tmp_path / "history.jsonl").read_text().splitlines()) == 2


def test_a_folder_with_recorded_rounds_and_no_checkpoint_is_still_refused(planted_cache, tmp_path):
    run_federate(planted_cache, tmp_path, rounds=2)
    (tmp_path / "summary.json").unlink()
    one_line(ConfigError, lambda: run_federate(planted_cache, tmp_path, rounds=2), "already holds a run (history.jsonl)")


def test_a_history_truncated_before_a_resume_is_refused(planted_cache, stopped):
    lines = (stopped / "history.jsonl").read_text().splitlines()
    (stopped / "history.jsonl").write_text(lines[0] + "\n")
    one_line(ConfigError, lambda: resume(planted_cache, stopped), "does not hold rounds 1 to 2")


def test_an_older_checkpoint_is_one_line(planted_cache, stopped):
    meta = json.loads((stopped / "checkpoint.json").read_text())
    meta.pop("format")
    (stopped / "checkpoint.json").write_text(json.dumps(meta))
    one_line(ConfigError, lambda: resume(planted_cache, stopped), "a checkpoint of an older fedclip")


def test_the_checkpoint_records_what_the_run_computed_on(stopped):
    meta, _ = checkpoint.load(stopped)
    assert {"cache_identity_sha256", "cache_checksums", "splits_sha256", "cache_inputs_fingerprint",
            "cache_model_fingerprint"} <= set(meta["inputs"])
    assert meta["inputs"]["cache_identity_sha256"] and meta["inputs"]["splits_sha256"]
