"""Unit tests for the math: adapter, losses and their hand-written gradients, engines, aggregation, splits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from federate import adapters, strategy
from federate.adapters import attai
from federate.engine import (BatchedTrainer, ClientSets, GenericTrainer, PlainTrainer, SequentialTrainer,
                             TrainSettings, client_generator, make_schedule)
from federate.losses import ce_grad, ce_loss, contrastive_grad, contrastive_loss
from federate.splits import split_indices


def init_adapters(dim, seed, towers=("image",)):
    adapter = attai.AttAI(text_tower="text" in towers)
    return adapters.init_params(adapter, dim, seed, torch.zeros(3, dim))


def test_adapter_has_525312_parameters_at_512_and_its_output_sums_to_one():
    module = attai.attai(512)
    assert sum(p.numel() for p in module.parameters()) == 525_312
    assert adapters.num_parameters(init_adapters(512, 0)) == 525_312
    x = torch.randn(7, 512)
    g = module(x)
    assert torch.allclose(g.sum(-1), torch.ones(7)) and (g > 0).all()
    state = {k: v[None] for k, v in init_adapters(512, 3).items()}
    module.load_state_dict({k.removeprefix("image."): v[0] for k, v in state.items()})
    fn, _ = attai.forward(*attai.layers(state, "image"), x[None])
    expected = torch.nn.functional.normalize(module(x) * x, dim=-1)
    torch.testing.assert_close(fn[0], expected, rtol=1e-5, atol=1e-6)


def test_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a, b, c = init_adapters(16, 0), init_adapters(16, 0), init_adapters(16, 1)
    assert torch.rand(1) == before
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["image.0.weight"], c["image.0.weight"])


def gens(k: int) -> list[torch.Generator]:
    return [client_generator(0, f"client{i}", 1) for i in range(k)]


def test_client_batch_order_depends_only_on_seed_client_and_round():
    order = lambda *key: torch.randperm(50, generator=client_generator(*key)).tolist()  # noqa: E731
    assert order(0, "photo", 3) == order(0, "photo", 3)
    assert order(0, "photo", 3) != order(0, "photo", 4) != order(1, "photo", 3) != order(0, "sketch", 3)


def padded_batch(k=3, B=8, d=12, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(k, B, d, generator=g), dim=-1)
    labels = torch.randint(0, C, (k, B), generator=g)
    valid = torch.ones(k, B, dtype=torch.bool)
    valid[1, 5:] = False  # a short last batch
    valid[2, 2:] = False
    return image, labels, valid


def test_contrastive_gradient_matches_autograd_on_padded_batches():
    image, labels, valid = padded_batch()
    text = torch.nn.functional.normalize(torch.randn(3, 8, 12), dim=-1)
    loss, d_image, d_text = contrastive_grad(image, text, valid, scale=30.0)
    for i in range(3):
        n = int(valid[i].sum())
        im, tx = image[i, :n].clone().requires_grad_(), text[i, :n].clone().requires_grad_()
        ref = contrastive_loss(im, tx, 30.0)
        ref.backward()
        assert loss[i].item() == pytest.approx(ref.item(), rel=1e-5)
        torch.testing.assert_close(d_image[i, :n], im.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(d_text[i, :n], tx.grad, rtol=1e-4, atol=1e-6)
        assert not d_image[i, n:].any()  # padding rows get no gradient


def test_ce_gradient_matches_autograd_on_padded_batches():
    image, labels, valid = padded_batch()
    texts = torch.nn.functional.normalize(torch.randn(3, 4, 12), dim=-1)
    loss, d_image, d_text = ce_grad(image, texts, labels, valid, scale=30.0)
    for i in range(3):
        n = int(valid[i].sum())
        im, tx = image[i, :n].clone().requires_grad_(), texts[i].clone().requires_grad_()
        ref = ce_loss(im, tx, labels[i, :n], 30.0)
        ref.backward()
        assert loss[i].item() == pytest.approx(ref.item(), rel=1e-5)
        torch.testing.assert_close(d_image[i, :n], im.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(d_text[i], tx.grad, rtol=1e-4, atol=1e-6)


def test_adapter_backward_matches_autograd():
    d = 10
    state = {k: v.expand(2, *v.shape).clone() for k, v in init_adapters(d, 0).items()}
    x = torch.randn(2, 6, d) + 1
    upstream = torch.randn(2, 6, d)
    W = attai.layers(state, "image")
    fn, saved = attai.forward(*W, x)
    grads = [torch.empty_like(t) for t in W]
    attai.backward(W[2], saved, upstream, grads)
    leaves = [t.clone().requires_grad_() for t in W]
    (attai.forward(*leaves, x)[0] * upstream).sum().backward()
    for mine, leaf in zip(grads, leaves):
        torch.testing.assert_close(mine, leaf.grad, rtol=1e-4, atol=1e-6)


def test_schedule_skips_batches_of_fewer_than_two_and_covers_every_row_once_per_epoch():
    idx, valid, active, steps = make_schedule([70, 65, 33], batch_size=32, epochs=2, generators=gens(3))
    # 70 = 32 + 32 + 6 -> 3 batches; 65 = 32 + 32 + 1 -> 2 (the lone row is skipped); 33 -> 1
    assert steps == [6, 4, 2] and active == [3, 3, 2, 2, 1, 1]
    for k, (n, nb) in enumerate([(70, 3), (65, 2), (33, 1)]):
        for e in range(2):
            rows = idx[e * nb:(e + 1) * nb, k][valid[e * nb:(e + 1) * nb, k]]
            assert len(rows) == min(n, nb * 32) and len(set(rows.tolist())) == len(rows)


@pytest.mark.parametrize("loss", ["contrastive", "ce"])
@pytest.mark.parametrize("towers", [("image",), ("image", "text")])
@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_fast_engines_reach_the_same_weights_as_the_plain_loop(loss, towers, mu):
    torch.manual_seed(0)
    d, C, sizes = 16, 5, [90, 64, 35]
    clients = ClientSets.of_tensors([torch.randn(n, d) + 1 for n in sizes], [torch.randint(0, C, (n,)) for n in sizes])
    text, start = torch.randn(C, d), init_adapters(d, 0, towers)
    settings = TrainSettings(lr=1e-3, loss=loss, mu=mu)
    adapter = attai.AttAI(text_tower="text" in towers)
    slow = strategy.stack(start, 3)
    loss_slow = PlainTrainer(adapter, clients, text, 20.0, settings).train(slow, 2, gens(3), start)
    for engine in (BatchedTrainer, SequentialTrainer, GenericTrainer):
        fast = strategy.stack(start, 3)
        loss_fast = engine(adapter, clients, text, 20.0, settings).train(fast, 2, gens(3), start)
        for k in start:
            assert (fast[k] - start[k]).abs().max() > 1e-3  # it trained
            torch.testing.assert_close(fast[k], slow[k], rtol=1e-4, atol=2e-6)
        torch.testing.assert_close(loss_fast, loss_slow, rtol=1e-4, atol=1e-5)


def test_fedprox_pulls_towards_the_anchor():
    torch.manual_seed(0)
    clients = ClientSets.of_tensors([torch.randn(64, 8) + 1], [torch.randint(0, 3, (64,))])
    start = init_adapters(8, 0)
    drift = {}
    for mu in (0.0, 10.0):
        state = strategy.stack(start, 1)
        BatchedTrainer(attai.AttAI(), clients, torch.randn(3, 8), 20.0, TrainSettings(lr=1e-2, mu=mu)).train(
            state, 5, gens(1), start)
        drift[mu] = sum((state[k][0] - start[k]).norm() for k in start)
    assert drift[10.0] < drift[0.0]


def test_aggregation_weights_uniform_and_by_samples():
    assert strategy.client_weights([10, 30, 60], "uniform").tolist() == pytest.approx([1 / 3] * 3)
    assert strategy.client_weights([10, 30, 60], "samples").tolist() == pytest.approx([0.1, 0.3, 0.6])
    stacked = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])}
    avg = strategy.FedAvg("samples").aggregate_train({"w": torch.zeros(2)}, stacked, [10, 30, 60])
    torch.testing.assert_close(avg["w"], torch.tensor([0.1 * 1 + 0.3 * 3 + 0.6 * 5, 0.1 * 2 + 0.3 * 4 + 0.6 * 9]))
    strategy.configure_train(stacked, avg)
    assert all(torch.equal(row, avg["w"]) for row in stacked["w"])


def test_splits_are_60_20_20_disjoint_and_deterministic_per_seed_and_domain():
    for n in (10, 101, 3929):
        s = split_indices(n, 0, "sketch")
        assert [len(s[p]) for p in ("train", "val", "test")] == [int(0.6 * n), int(0.2 * n), int(0.2 * n)]
        allrows = np.concatenate(list(s.values()))
        assert len(set(allrows.tolist())) == len(allrows) and allrows.max() < n
    a, b = split_indices(500, 0, "photo"), split_indices(500, 0, "photo")
    assert all(np.array_equal(a[p], b[p]) for p in a)
    assert not np.array_equal(a["train"], split_indices(500, 1, "photo")["train"])
    assert not np.array_equal(a["train"], split_indices(500, 0, "cartoon")["train"])
