"""Checkpoint and resume (federate/federation.py, federate/checkpoint.py): a run killed after some round
and started again with the same command and folder ends exactly as an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import PACS_MINI, ROOT, config, outputs, run_federate, same_outputs
from planted import planted, write_cache
from safetensors.torch import load_file

from federate.errors import ConfigError
from federate.federation import Interrupted
from federate.run import CachedBackend


@pytest.mark.parametrize("overrides", [["strategy=fedadam", "strategy.server_lr=1e-3"], ["strategy=fedavgm"],
                                       ["method=local"], ["clients_per_round=2", "selection=val_rows"]])
def test_a_run_interrupted_after_a_round_resumes_to_the_same_outputs(planted_cache, tmp_path, monkeypatch, overrides):
    whole = tmp_path / "whole"
    run_federate(planted_cache, whole, *overrides, rounds=6)
    train = CachedBackend.train

    def interrupted(self, federation, round_, sampled):
        if round_ == 4:
            raise KeyboardInterrupt
        return train(self, federation, round_, sampled)

    out = tmp_path / "cut"
    monkeypatch.setattr(CachedBackend, "train", interrupted)
    with pytest.raises(Interrupted, match="interrupted after round 3 of 6; resume with: "):
        run_federate(planted_cache, out, *overrides, rounds=6)
    assert (out / "checkpoint.json").exists() and not (out / "summary.json").exists()
    monkeypatch.setattr(CachedBackend, "train", train)
    run_federate(planted_cache, out, *overrides, rounds=6)
    same_outputs(outputs(whole), outputs(out))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())  # no checkpoint left


def test_a_checkpoint_holds_the_selected_rounds_adapters_once_when_they_are_the_current_ones(planted_cache, tmp_path,
                                                                                              monkeypatch):
    """300 personal adapters weigh 630 MB: the checkpoint of a round that was selected does not write them twice."""
    from federate import checkpoint

    train = CachedBackend.train
    monkeypatch.setattr(CachedBackend, "train", lambda self, fed, r, s: (_ for _ in ()).throw(KeyboardInterrupt)
                        if r == 3 else train(self, fed, r, s))
    with pytest.raises(Interrupted):
        run_federate(planted_cache, tmp_path, "method=local", "lr=1e-2", rounds=6)
    meta, tensors = checkpoint.load(tmp_path)
    assert meta["round"] == 2 and meta["best_row"]["round"] == 2 and meta["best_is_current"]
    assert {k.split("/")[0] for k in tensors} == {"personal"}  # (local shares nothing)


def test_another_config_in_an_unfinished_runs_folder_is_refused_naming_what_differs(planted_cache, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setattr(CachedBackend, "train", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(Interrupted):
        run_federate(planted_cache, tmp_path, rounds=4)
    with pytest.raises(ConfigError, match=r"holds an unfinished run of another config \(lr=0.01 \(was 0.001\)\)"):
        run_federate(planted_cache, tmp_path, "lr=1e-2", rounds=4)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    domains, text = planted({"alpha": 60, "beta": 50, "gamma": 40, "target": 30})
    return write_cache(tmp_path_factory.mktemp("small") / "planted.h5", domains, text)


SLOW_ROUNDS = ["rounds=8", "engine=plain", "batch_size=4"]  # slow enough rounds to be killed in between


def federate_cli(cache, out):
    args = [sys.executable, "-m", "federate", f"cache_file={cache}", "model.name=fedclip/planted",
            "target_domain=target", "lr=1e-3", *SLOW_ROUNDS, f"hydra.run.dir={out}"]
    return subprocess.Popen(args, cwd=out.parent, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_after_round(proc, out, rounds: int, sig) -> None:
    history = out / "history.jsonl"
    deadline = time.time() + 120
    while not (history.exists() and history.read_text().count("\n") >= rounds):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_a_sigkilled_run_resumes_with_the_same_command_and_ctrl_c_says_how(small_cache, tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "cut"
    killed = federate_cli(small_cache, out)
    kill_after_round(killed, out, 2, signal.SIGKILL)
    assert not (out / "summary.json").exists() and (out / "checkpoint.json").exists()

    stopped = federate_cli(small_cache, out)
    kill_after_round(stopped, out, 4, signal.SIGINT)  # Ctrl-C
    lines = [line for line in stopped.stdout.read().splitlines() if "resume with" in line]
    assert stopped.returncode == 130 and len(lines) == 1, lines
    assert f"hydra.run.dir={out}" in lines[0] and "engine=plain" in lines[0] and "Traceback" not in lines[0]

    resumed = federate_cli(small_cache, out)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()[-2000:]
    run_federate(small_cache, whole, *SLOW_ROUNDS[1:], rounds=8)
    same_outputs(outputs(whole), outputs(out))
    assert not list(out.glob("checkpoint*"))


@pytest.mark.slow
@pytest.mark.skipif(not PACS_MINI.is_dir(), reason=f"{PACS_MINI} is absent")
def test_an_interrupted_backbone_run_resumes_to_the_same_model(tiny_model, tmp_path, monkeypatch):
    """The whole tiny CLIP trains on the images (an AlexNet run resumes the same way, only slower)."""
    from federate.backbone.runner import ImageBackend
    from federate.run import run

    cfg = config("federate", [f"dataset.root={PACS_MINI}", "dataset.domains=[art_painting,cartoon,photo]",
                              f"model.name={tiny_model}", "method=fedavg_full", "backbone.num_workers=0", "rounds=2",
                              "lr=1e-4", "strategy=fedavgm"])
    whole = run(cfg, tmp_path / "whole")
    train = ImageBackend.train

    def interrupted(self, federation, round_, sampled):
        if round_ == 2:
            raise KeyboardInterrupt
        return train(self, federation, round_, sampled)

    monkeypatch.setattr(ImageBackend, "train", interrupted)
    with pytest.raises(Interrupted, match="after round 1 of 2"):
        run(cfg, tmp_path / "cut")
    monkeypatch.setattr(ImageBackend, "train", train)
    resumed = run(cfg, tmp_path / "cut")
    for key in ("best_round", "generalization", "personalization", "val_mean"):
        assert resumed[key] == whole[key]
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [[{k: v for k, v in json.loads(line).items() if "seconds" not in k}  # times differ, nothing else
             for line in (tmp_path / d / "history.jsonl").read_text().splitlines()] for d in ("whole", "cut")]
    assert rows[0] == rows[1] and len(rows[0]) == 2
