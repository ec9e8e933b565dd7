"""Many small clients cost what their rows cost (federate/engine.py): one set of buffers for all clients,
no copies of their rows, and Adam's first step without moments."""
from __future__ import annotations

import pytest
import torch
from torch.optim.adam import adam

from federate import strategy
from federate.adapters import attai
from federate.engine import (BatchedTrainer, ClientSets, PlainTrainer, SequentialTrainer, TrainSettings,
                             client_generator, first_adam_step)


def init(d: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {f"image.{k}": v for k, v in attai.attai(d).state_dict().items()}


def test_one_inner_trainer_and_one_set_of_buffers_serve_every_client():
    torch.manual_seed(0)
    d, C, sizes = 16, 4, [40] + [9] * 30  # one client of two batches, thirty of one batch of 9 rows
    features = [torch.randn(n, d) + 1 for n in sizes]
    clients = ClientSets.of_tensors(features, [torch.randint(0, C, (n,)) for n in sizes])
    assert clients.client(3).x is clients.x  # a client's rows index the one pool, no copy
    text, start, settings = torch.randn(C, d), init(d), TrainSettings(lr=1e-3, batch_size=32)
    trainer = SequentialTrainer(attai.AttAI(), clients, text, 20.0, settings)
    gens = [client_generator(0, f"c{k}", 1) for k in range(len(sizes))]
    fast = strategy.stack(start, len(sizes))
    loss_fast = trainer.train(fast, 1, gens)
    bufs = trainer.trainer._bufs
    assert len(bufs) == 3 and all(t.shape[0] == 1 for b in bufs for t in b.values())
    slow = strategy.stack(start, len(sizes))
    loss_slow = PlainTrainer(attai.AttAI(), clients, text, 20.0, settings).train(
        slow, 1, [client_generator(0, f"c{k}", 1) for k in range(len(sizes))])
    for k in start:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(loss_fast, loss_slow, rtol=1e-4, atol=1e-5)


def test_the_first_adam_step_in_closed_form_is_torchs_adam():
    torch.manual_seed(0)
    s = TrainSettings(lr=1e-3, weight_decay=0.2)
    params = [torch.randn(3, 8, 8), torch.randn(3, 8)]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    ref_p, ref_m, ref_v = [p.clone() for p in params], [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    adam(ref_p, [g.clone() for g in grads], ref_m, ref_v, [], [torch.zeros(()) for _ in params], fused=True,
         amsgrad=False, beta1=s.betas[0], beta2=s.betas[1], lr=s.lr, weight_decay=s.weight_decay, eps=s.eps,
         maximize=False)
    for keep in (True, False):
        p, m, v = [t.clone() for t in params], [torch.full_like(t, 7.0) for t in params], [torch.full_like(t, 7.0) for t in params]
        first_adam_step(p, [g.clone() for g in grads], m, v, s, keep_moments=keep)
        for a, b in zip(p, ref_p):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        if keep:  # the moments a second step reads
            for a, b in zip(m + v, ref_m + ref_v):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


def test_a_round_of_many_clients_matches_the_lock_step_engine():
    torch.manual_seed(2)
    d, C, sizes = 16, 3, [70, 33, 20, 9, 5]
    clients = ClientSets.of_tensors([torch.randn(n, d) for n in sizes], [torch.randint(0, C, (n,)) for n in sizes])
    text, start, settings = torch.randn(C, d), init(d), TrainSettings(lr=1e-2, mu=0.1)
    out = []
    for engine in (SequentialTrainer, BatchedTrainer):
        state = strategy.stack(start, len(sizes))
        out.append((engine(attai.AttAI(), clients, text, 20.0, settings).train(
            state, 2, [client_generator(0, f"c{k}", 3) for k in range(len(sizes))], start), state))
    torch.testing.assert_close(out[0][0], out[1][0])
    for k in start:
        torch.testing.assert_close(out[0][1][k], out[1][1][k])


@pytest.mark.parametrize("loss,precision,mu", [("contrastive", "fp32", 0.0), ("ce", "fp32", 0.1),
                                                 ("contrastive", "bf16", 0.0)])
def test_clients_added_up_as_they_train_give_the_mean_of_the_clients_trained_apart(monkeypatch, loss, precision, mu):
    """SequentialTrainer.train_mean (the CPU default for an aggregating method): large clients train one after
    another, clients of one batch have their activations computed together and their first Adam step folded
    into the sum (BatchedTrainer.fold_first_steps, a few clients at a time); the weighted mean is that of
    every client trained on its own copy by torch's autograd and Adam."""
    monkeypatch.setattr(BatchedTrainer, "FOLD_ROWS", 20)  # groups of a few one-step clients
    torch.manual_seed(6)
    d, C = 16, 4
    sizes = [70, 40, 33, 17, 12, 9, 9, 5, 2, 1]  # 3 and 2 steps; one step each; a lone row trains no step
    clients = ClientSets.of_tensors([torch.randn(n, d) + 1 for n in sizes], [torch.randint(0, C, (n,)) for n in sizes])
    text, start = torch.randn(C, d), init(d)
    settings = TrainSettings(lr=1e-2, batch_size=32, loss=loss, mu=mu, precision=precision)
    weights = strategy.client_weights(sizes, "samples")
    gens = lambda: [client_generator(0, f"c{k}", 1) for k in range(len(sizes))]  # noqa: E731
    folded = []
    fold = BatchedTrainer.fold_first_steps
    monkeypatch.setattr(BatchedTrainer, "fold_first_steps", lambda self, s, group, *a: folded.append(len(group)) or
                        fold(self, s, group, *a))
    trainer = SequentialTrainer(attai.AttAI(), clients, text, 20.0, settings)
    mean, losses = trainer.train_mean(start, 1, gens(), weights.tolist(), anchor=start)
    assert folded == [7]  # the clients of 33 (one batch of 32 and a lone row) to 2 rows
    stacked = strategy.stack(start, len(sizes))
    plain_losses = PlainTrainer(attai.AttAI(), clients, text, 20.0, settings).train(stacked, 1, gens(), start)
    tol = dict(rtol=1e-4, atol=2e-6) if precision == "fp32" else dict(rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(losses, plain_losses.float(), **tol)
    expected = strategy.weighted_mean(stacked, weights)
    for k in start:
        torch.testing.assert_close(mean[k], expected[k], **tol)
    assert not torch.equal(mean["image.0.weight"], start["image.0.weight"])


def test_batches_gathered_in_chunks_give_the_same_round(monkeypatch):
    from federate.engine import LockstepTrainer

    torch.manual_seed(3)
    d, C, sizes = 16, 3, [200, 90, 40]  # 7, 3 and 2 steps
    clients = ClientSets.of_tensors([torch.randn(n, d) for n in sizes], [torch.randint(0, C, (n,)) for n in sizes])
    text, start = torch.randn(C, d), init(d)
    results = []
    for chunk in (256, 2):  # a whole round at once, or two steps at a time
        monkeypatch.setattr(LockstepTrainer, "CHUNK", chunk)
        for engine, precision in ((BatchedTrainer, "fp32"), (SequentialTrainer, "bf16")):
            state = strategy.stack(start, len(sizes))
            loss = engine(attai.AttAI(), clients, text, 20.0, TrainSettings(lr=1e-3, precision=precision)).train(
                state, 1, [client_generator(0, f"c{k}", 1) for k in range(len(sizes))])
            results.append((loss, state))
    for (loss_a, a), (loss_b, b) in zip(results[:2], results[2:]):
        torch.testing.assert_close(loss_a, loss_b)
        for k in start:
            torch.testing.assert_close(a[k], b[k])


def test_accuracy_in_blocks_of_rows_is_the_accuracy(monkeypatch):
    from federate import evaluate
    from federate.rows import Rows

    torch.manual_seed(4)
    x, y, text, params = torch.randn(1000, 16), torch.randint(0, 3, (1000,)), torch.randn(3, 16), init(16)
    whole = evaluate.accuracies(attai.AttAI(), [params], [Rows.of(x, y)], text, 20.0)
    expected = (attai.AttAI().logits(params, x, text, 20.0).argmax(1) == y).float().mean().item()
    assert whole == pytest.approx([expected], abs=1e-7)
    monkeypatch.setattr(evaluate, "EVAL_ROWS", 64)
    assert evaluate.accuracies(attai.AttAI(), [params], [Rows.of(x, y)], text, 20.0) == whole


def test_clients_evaluated_with_one_adapter_in_one_pass_each_get_their_own_accuracy(monkeypatch):
    from federate import evaluate
    from federate.rows import Rows

    monkeypatch.setattr(evaluate, "EVAL_ROWS", 64)  # blocks that cut across clients
    torch.manual_seed(5)
    x, y, text, params = torch.randn(1000, 16), torch.randint(0, 3, (1000,)), torch.randn(3, 16), init(16)
    other = {k: v + 0.5 * torch.randn_like(v) for k, v in params.items()}
    sets = [Rows(x, y, rows) for rows in torch.randperm(1000).split([1, 7, 300, 0, 92, 600])]
    states = [params, params, other, params, params, other]  # two adapters, shared by several sets each
    got = evaluate.accuracies(attai.AttAI(), states, sets, text, 20.0)
    one_by_one = [evaluate.accuracies(attai.AttAI(), [s], [r], text, 20.0)[0] for s, r in zip(states, sets)]
    direct = [(attai.AttAI().logits(s, r.gather()[0], text, 20.0).argmax(1) == r.labels).float().mean().item()
              if len(r) else 0.0 for s, r in zip(states, sets)]
    assert got == one_by_one == pytest.approx(direct, abs=1e-7)


def test_a_strategy_that_reads_each_client_gets_them_stacked(planted_cache, tmp_path, monkeypatch):
    """The built-in strategies read only the weighted mean, which the CPU runner adds up as clients train; a
    strategy that needs each client's adapter (a robust aggregation) gets them stacked, and the image backbones,
    which hold one model at a time, refuse it in one line."""
    from conftest import config

    from federate import methods
    from federate.backbone.runner import run_images
    from federate.errors import ConfigError
    from federate.run import CachedBackend, setup

    cfg = config("federate", [f"cache_file={planted_cache}", "model.name=fedclip/planted", "target_domain=target"])
    for each, rows in ((False, 1), (True, 3)):
        monkeypatch.setattr(strategy.FedAvg, "reads_each_client", each)
        (tmp_path / str(each)).mkdir()
        point = setup(cfg, methods.build(cfg.method), tmp_path / str(each), progress=False)
        point.federation.runlog.close()
        update = CachedBackend(point).train(point.federation, 1, [0, 1, 2])
        assert len(update.num_examples) == rows and update.stacked["image.0.weight"].shape[0] == rows
    with pytest.raises(ConfigError, match="strategy=fedavg reads each client's model; the image backbones"):
        full = config("federate", ["method=fedavg_full"])
        run_images(full, methods.build(full.method), tmp_path / "images", 0.0)
