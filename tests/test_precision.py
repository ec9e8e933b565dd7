"""precision=bf16: the adapter's matmuls in bf16 (fp32 weights, gradients, Adam state); behaviour, not timing."""
from __future__ import annotations

import pytest
import torch
from conftest import run_federate

from federate import adapters, strategy
from federate.adapters import attai
from federate.engine import (BatchedTrainer, ClientSets, GenericTrainer, PlainTrainer, SequentialTrainer,
                             TrainSettings, client_generator)
from federate.errors import ConfigError

@pytest.fixture
def cache_file(planted_cache):
    return planted_cache


def federate(cache_file, out, *overrides):
    return run_federate(cache_file, out, *overrides, rounds=8)


def test_bf16_kernels_are_close_to_fp32_and_keep_fp32_gradients():
    torch.manual_seed(0)
    k, n, d = 2, 32, 128
    state = {key: v.expand(k, *v.shape).clone() for key, v in
             adapters.init_params(attai.AttAI(), d, 0, torch.zeros(3, d)).items()}
    W = attai.layers(state, "image")
    x, upstream = torch.randn(k, n, d) + 1, torch.randn(k, n, d)
    out = {}
    for low in (None, torch.bfloat16):
        fn, saved = attai.forward(*W, x, low)
        grads = [torch.empty_like(t) for t in W]
        attai.backward(W[2], saved, upstream, grads)
        assert fn.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
        out[low] = fn, grads
    torch.testing.assert_close(out[torch.bfloat16][0], out[None][0], rtol=0, atol=2e-3)
    for g16, g32 in zip(out[torch.bfloat16][1], out[None][1]):
        assert (g16 - g32).norm() / g32.norm() < 0.03  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("engine", [BatchedTrainer, SequentialTrainer, GenericTrainer, PlainTrainer])
def test_every_engine_trains_in_bf16_to_nearly_the_fp32_losses(engine):
    torch.manual_seed(0)
    d, C, sizes = 32, 5, [90, 64, 35]
    clients = ClientSets.of_tensors([torch.randn(n, d) + 1 for n in sizes], [torch.randint(0, C, (n,)) for n in sizes])
    text, start = torch.randn(C, d), adapters.init_params(attai.AttAI(), d, 0, torch.zeros(C, d))
    losses, states = {}, {}
    for precision in ("fp32", "bf16"):
        states[precision] = strategy.stack(start, 3)
        gens = [client_generator(0, f"client{i}", 1) for i in range(3)]
        losses[precision] = engine(attai.AttAI(), clients, text, 20.0, TrainSettings(lr=1e-3, precision=precision)) \
            .train(states[precision], 2, gens, start)
    assert all(v.dtype == torch.float32 for v in states["bf16"].values())  # master weights stay fp32
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=3e-3, atol=3e-3)
    for key in start:
        moved = (states["fp32"][key] - start[key]).norm()
        assert (states["bf16"][key] - states["fp32"][key]).norm() < 0.5 * moved


def test_a_bf16_run_reaches_the_fp32_accuracies_and_records_its_precision(cache_file, tmp_path):
    fp32 = federate(cache_file, tmp_path / "fp32")
    bf16 = federate(cache_file, tmp_path / "bf16", "precision=bf16")
    assert fp32["precision"] == "fp32" and bf16["precision"] == "bf16"
    for key in ("generalization", "personalization_mean", "overall"):
        assert bf16[key] == pytest.approx(fp32[key], abs=0.03), key
    assert bf16["generalization"] > 0.6  # it learned (zero-shot is below 0.6 here)


@pytest.mark.parametrize("overrides", [["adapter=clip_adapter"], ["text_adapter=true", "loss=ce"]])
def test_bf16_runs_with_the_generic_engine_and_the_text_tower(cache_file, tmp_path, overrides):
    fp32 = federate(cache_file, tmp_path / "a", "rounds=4", *overrides)
    bf16 = federate(cache_file, tmp_path / "b", "rounds=4", "precision=bf16", *overrides)
    assert bf16["overall"] == pytest.approx(fp32["overall"], abs=0.03)


def test_an_unknown_precision_is_refused(cache_file, tmp_path):
    with pytest.raises(ConfigError, match="precision must be fp32 or bf16"):
        federate(cache_file, tmp_path, "precision=fp16")
