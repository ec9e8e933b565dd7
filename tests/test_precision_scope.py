"""precision=bf16 in the generic and plain engines has the fast path's scope: the adapter's own matmuls
in bf16, elementwise math, the logits against the class prompts and the loss in fp32."""
from __future__ import annotations

import pytest
import torch

from federate import adapters, strategy
from federate.adapters import attai
from federate.adapters.clip_adapter import CLIPAdapter
from federate.engine import BatchedTrainer, ClientSets, GenericTrainer, PlainTrainer, TrainSettings, client_generator
from federate.matmul_precision import adapter_logits

BF16 = torch.bfloat16


def bf16_matmul(a, b):
    return (a.to(BF16) @ b.to(BF16)).float()


@pytest.mark.parametrize("engine", [GenericTrainer, PlainTrainer])
@pytest.mark.parametrize("loss", ["contrastive", "ce"])
def test_generic_and_plain_bf16_train_as_the_fast_path(engine, loss):
    torch.manual_seed(0)
    d, C, sizes = 32, 5, [90, 64, 35]
    clients = ClientSets.of_tensors([torch.randn(n, d) + 1 for n in sizes], [torch.randint(0, C, (n,)) for n in sizes])
    text, start = torch.randn(C, d), adapters.init_params(attai.AttAI(), d, 0, torch.zeros(C, d))
    states = {}
    for trainer in (BatchedTrainer, engine):
        states[trainer] = strategy.stack(start, 3)
        generators = [client_generator(0, f"client{i}", 1) for i in range(3)]
        trainer(attai.AttAI(), clients, text, 20.0, TrainSettings(lr=1e-3, precision="bf16", loss=loss)) \
            .train(states[trainer], 2, generators, start)
    for key in start:  # autocast (the logits' matmul in bf16 too) was 0.3 of the movement away
        moved = (states[BatchedTrainer][key] - start[key]).abs().max()
        assert (states[engine][key] - states[BatchedTrainer][key]).abs().max() < 0.02 * moved, key


def test_only_the_adapters_matmuls_are_bf16():
    torch.manual_seed(0)
    x, text = torch.randn(6, 16) + 1, torch.randn(3, 16)
    adapter = CLIPAdapter()
    params = adapters.init_params(adapter, 16, 0, text)
    logits = adapter_logits(adapter, params, x, text, 10.0, BF16)
    hidden = torch.relu(bf16_matmul(x, params["image.0.weight"].T))  # ReLU on the fp32 product
    image = 0.2 * torch.relu(bf16_matmul(hidden, params["image.2.weight"].T)) + 0.8 * x
    expected = 10.0 * torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-5)  # the logits' matmul in fp32
    assert not torch.allclose(logits, adapter.logits(params, x, text, 10.0), rtol=0, atol=1e-4)  # yet not fp32
    assert torch.equal(adapter_logits(adapter, params, x, text, 10.0, None), adapter.logits(params, x, text, 10.0))


def test_linear_bias_is_added_in_fp32():
    from federate.matmul_precision import LowPrecisionMatmuls

    x, w, b = torch.randn(4, 8), torch.randn(3, 8), torch.randn(3) * 1e-3
    with LowPrecisionMatmuls(BF16):
        out = torch.nn.functional.linear(x, w, b)
    assert out.dtype == torch.float32 and torch.equal(out, bf16_matmul(x, w.T) + b)
