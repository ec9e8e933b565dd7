"""The plug-in core: adapters, server strategies and methods behind registries, and the extension recipe
(a toy adapter defined here, registered through the public interface only, trained by `federate`)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import PLANTED_SIZES, run_federate
from planted import planted, write_cache

from federate import adapters, strategy
from federate.adapters.clip_adapter import CLIPAdapter
from federate.adapters.linear_head import LinearHead
from federate.errors import ConfigError
from federate.report import report



@adapters.register("toy_scale", init_scale=1.0)
class ToyScale(adapters.Adapter):
    """A learnable per-dimension scale of the image embedding: the README's worked example."""
    towers = ("image",)

    def __init__(self, init_scale: float = 1.0, text_tower: bool = False):
        super().__init__(text_tower=text_tower, init_scale=init_scale)

    def init(self, dim, text):
        return {"image.scale": torch.full((dim,), float(self.settings["init_scale"]))}

    def image(self, params, x):
        return x * params["image.scale"]


@pytest.fixture(scope="module")
def biased_cache(tmp_path_factory):
    """Zero-shot CLIP is biased on every domain, the held-out one included: all domains share an offset
    in the dimensions where the class prompts have random components (little per-domain style)."""
    domains, text = planted(PLANTED_SIZES, style=0.3)
    common = np.zeros(64)
    common[5:21] = np.random.default_rng(1).normal(0, 3, 16)
    domains = {k: (x + common, y) for k, (x, y) in domains.items()}
    return write_cache(tmp_path_factory.mktemp("biased") / "planted.h5", domains, text)


def federate(cache, out, *overrides):
    return run_federate(cache, out, *overrides)


def test_clip_adapter_is_a_residual_bottleneck_mlp_of_131k_parameters_at_512():
    adapter = CLIPAdapter()
    params = adapters.init_params(adapter, 512, 0, torch.zeros(7, 512))
    assert adapters.num_parameters(params) == 131_072
    x = torch.randn(5, 512)
    mlp = torch.relu(torch.relu(x @ params["image.0.weight"].T) @ params["image.2.weight"].T)
    torch.testing.assert_close(adapter.image(params, x), 0.2 * mlp + 0.8 * x)


def test_linear_head_starts_as_zero_shot_clip():
    text, x = torch.randn(7, 32), torch.randn(50, 32)
    head = LinearHead()
    logits = head.logits(adapters.init_params(head, 32, 0, text), x, text, 100.0)
    zero_shot = adapters.Adapter().logits({}, x, text, 100.0)
    torch.testing.assert_close(logits, zero_shot)


@pytest.mark.parametrize("adapter", ["clip_adapter", "linear_head"])
def test_new_adapters_beat_zero_shot_on_a_biased_held_out_domain(biased_cache, tmp_path, adapter):
    zero = federate(biased_cache, tmp_path / "z", "method=zeroshot")
    s = federate(biased_cache, tmp_path / "a", f"adapter={adapter}", "lr=1e-2")
    assert zero["generalization"] < 0.3 and s["generalization"] > zero["generalization"] + 0.3, (zero, s)
    assert s["adapter"]["name"] == adapter and s["engine"] == "auto"
    assert s["trainable_params"] == {"clip_adapter": 2 * 64 * 16, "linear_head": 5 * 64 + 5}[adapter]
    assert s["loss"] == "ce"  # both configs pick CE, as a linear head and CLIP-Adapter train


def test_fedavgm_without_momentum_and_unit_server_lr_is_fedavg():
    g = {"w": torch.randn(4, 3)}
    stacked = {"w": torch.randn(3, 4, 3)}
    plain = strategy.FedAvg("samples").aggregate_train(g, stacked, [1, 2, 3])
    m = strategy.FedAvgM("samples", server_lr=1.0, momentum=0.0).aggregate_train(g, stacked, [1, 2, 3])
    torch.testing.assert_close(plain["w"], m["w"])


def test_fedadam_and_fedavgm_follow_their_update_rules_over_two_rounds():
    g = {"w": torch.tensor([1.0, -2.0])}
    rounds = [torch.tensor([[2.0, -2.0], [4.0, -1.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])]
    adam = strategy.FedAdam("uniform", server_lr=0.1, beta1=0.5, beta2=0.75, tau=0.01)
    avgm = strategy.FedAvgM("uniform", server_lr=0.5, momentum=0.9)
    wa, wm, m, v, vel = dict(g), dict(g), torch.zeros(2), torch.zeros(2), torch.zeros(2)
    for clients in rounds:
        delta_a, delta_m = clients.mean(0) - wa["w"], clients.mean(0) - wm["w"]
        m, v = 0.5 * m + 0.5 * delta_a, 0.75 * v + 0.25 * delta_a ** 2
        expected_a = wa["w"] + 0.1 * m / (v.sqrt() + 0.01)
        vel = 0.9 * vel + delta_m
        expected_m = wm["w"] + 0.5 * vel
        wa, wm = adam.aggregate_train(wa, {"w": clients}, [1, 1]), avgm.aggregate_train(wm, {"w": clients}, [1, 1])
        torch.testing.assert_close(wa["w"], expected_a)
        torch.testing.assert_close(wm["w"], expected_m)


@pytest.mark.parametrize("overrides", [["strategy=fedadam", "strategy.server_lr=1e-2"], ["strategy=fedavgm"]])
def test_server_optimisers_run_and_converge(biased_cache, tmp_path, overrides):
    s = federate(biased_cache, tmp_path, *overrides)
    assert s["personalization_mean"] > 0.9 and s["generalization"] > 0.6, s
    assert s["strategy"]["name"] == overrides[0].split("=")[1] and "server_lr" in s["strategy"]
    losses = [json.loads(x)["train_loss"]["alpha"] for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] and all(math.isfinite(v) for v in losses)


def test_a_toy_adapter_registered_in_a_test_file_trains_end_to_end(biased_cache, tmp_path):
    s = federate(biased_cache, tmp_path, "adapter=toy_scale", "adapter.init_scale=0.5", "lr=1e-2", "rounds=5")
    assert s["adapter"] == {"name": "toy_scale", "init_scale": 0.5} and s["trainable_params"] == 64
    assert s["bytes_per_round"]["up"] == 3 * 4 * 64
    from safetensors.torch import load_file

    scale = load_file(tmp_path / "adapter.safetensors")["image.scale"]
    assert scale.shape == (64,) and not torch.allclose(scale, torch.full((64,), 0.5))  # it trained


def test_every_engine_that_can_train_an_adapter_gives_the_same_run(biased_cache, tmp_path):
    a = federate(biased_cache, tmp_path / "a", "adapter=clip_adapter", "rounds=3", "engine=generic")
    b = federate(biased_cache, tmp_path / "b", "adapter=clip_adapter", "rounds=3", "engine=plain")
    assert a["val_mean"] == pytest.approx(b["val_mean"], abs=1e-9) and a["best_round"] == b["best_round"]
    with pytest.raises(ConfigError, match="engine=batched uses AttAI's hand-written gradients"):
        federate(biased_cache, tmp_path / "c", "adapter=clip_adapter", "engine=batched")


def test_settings_an_adapter_or_strategy_cannot_take_are_one_line_errors(biased_cache, tmp_path):
    with pytest.raises(ConfigError, match="adapter clip_adapter has no text-tower variant"):
        federate(biased_cache, tmp_path / "a", "adapter=clip_adapter", "text_adapter=true")
    with pytest.raises(ConfigError, match="strategy fedadam: .*unexpected keyword argument 'eta'"):
        federate(biased_cache, tmp_path / "b", "strategy=fedadam", "+strategy.eta=1")


def test_adapters_and_strategies_are_separate_report_rows(biased_cache, tmp_path):
    for i, overrides in enumerate([[], ["adapter=clip_adapter"], ["strategy=fedavgm"], ["seed=1"]]):
        federate(biased_cache, tmp_path / str(i), "rounds=2", *overrides)
    text = report(tmp_path, make_plots=False)
    assert "fedclip (adapter=clip_adapter(reduction=4, ratio=0.2), loss=ce, rounds=2)" in text
    assert "fedclip (strategy=fedavgm(server_lr=1.0, momentum=0.9), rounds=2)" in text
    assert "± " in text and "(2)" in text  # the two seeds of plain fedclip are one row


@pytest.mark.slow
def test_a_terminal_shows_a_progress_bar_and_the_log_file_keeps_the_round_lines(biased_cache, tmp_path):
    import os
    import pty
    import subprocess
    import sys

    from conftest import ROOT

    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()  # an interactive terminal of 40 x 150, as a person would run it
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "federate", f"cache_file={biased_cache}", "model.name=fedclip/planted",
                             "target_domain=target", "rounds=6", "lr=1e-3", f"hydra.run.dir={tmp_path}/run"],
                            cwd=tmp_path, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    text = screen.decode(errors="replace")
    assert "6/6" in text and "best target" in text and "round 3/6" not in text
    log_file = (tmp_path / "run" / "federate.log").read_text()
    assert all(f"round {r}/6" in log_file for r in range(1, 7))
