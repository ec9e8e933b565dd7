"""Differential privacy (federate/privacy.py, docs/privacy.md): DP-SGD's step against Opacus' DPOptimizer, its
epsilon against Opacus' accountants, DP-FedAvg against Flower's wrapper and accountant, every method and
adapter under DP-SGD, the plan that stops a run before it trains, and every refusal."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import config, run_federate
from planted import one_line, planted, write_cache
from torch import nn

from federate import methods, privacy
from federate.adapters import attai
from federate.adapters.attai import AttAI
from federate.engine import (ClientSets, GenericTrainer, SampleDP, SequentialTrainer, TrainSettings, BatchedTrainer,
                             make_poisson_schedule, make_trainer, poisson_rate)
from federate.errors import ConfigError
from federate.strategy import FedAvg

opacus = pytest.importorskip("opacus")



def refused(fn, *match) -> str:
    """`fn` raises a one-line ConfigError holding every `match`."""
    return one_line(ConfigError, fn, *match)


# --- DP-SGD's step: Opacus' DPOptimizer on the same module, batches and clipping

class AttAIModule(nn.Module):
    """AttAI as FedCLIP's model computes its class logits: scale * cos(g(x) * x, prompt)."""

    def __init__(self, state, text, scale):
        super().__init__()
        self.image = attai.attai(text.shape[1])
        self.image.load_state_dict({k[len("image."):]: v for k, v in state.items()})
        self.text, self.scale = nn.functional.normalize(text, dim=-1), scale

    def forward(self, x):
        f = self.image(x) * x
        return self.scale * nn.functional.normalize(f, dim=-1) @ self.text.T


def opacus_steps(state, text, scale, x, y, batches, expected, settings):
    """Opacus' DP-SGD on `batches` (row indices): GradSampleModule + DPOptimizer(torch's Adam), noise 0."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = GradSampleModule(AttAIModule(state, text, scale))
    adam = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=settings.betas, eps=settings.eps,
                            weight_decay=settings.weight_decay)
    opt = DPOptimizer(adam, noise_multiplier=0.0, max_grad_norm=settings.dp.max_grad_norm,
                      expected_batch_size=expected)
    for rows in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()  # Opacus' usage: the mean loss
        opt.step()
    return {k.removeprefix("_module."): v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("engine", ["generic", "sequential", "batched"])
@pytest.mark.parametrize("n", [12, 40])  # one batch of every row (q = 1), three Poisson batches (q = 1/3)
def test_a_clipped_step_equals_opacus_dpoptimizer_with_noise_zero(engine, n):
    torch.manual_seed(0)
    d, C = 16, 5
    text = torch.randn(C, d)
    x, y = torch.randn(n, d), torch.randint(0, C, (n,))
    state = {k: v.clone() for k, v in AttAI().init(d, text).items()}
    settings = TrainSettings(lr=1e-2, batch_size=16, loss="ce", dp=SampleDP(max_grad_norm=0.05, noise_multiplier=0.0))
    clients = ClientSets.of_tensors([x], [y])
    trainer = make_trainer(engine, AttAI(), clients, text, 20.0, settings)
    assert isinstance(trainer, {"generic": GenericTrainer, "sequential": SequentialTrainer,
                                "batched": BatchedTrainer}[engine])
    stacked = {k: v.unsqueeze(0).clone() for k, v in state.items()}
    trainer.train(stacked, 1, [torch.Generator().manual_seed(7)])
    # the same Poisson batches, drawn from the same generator
    idx, valid, _, steps, _, expected = make_poisson_schedule([n], 16, 1, [torch.Generator().manual_seed(7)], "cpu")
    batches = [idx[s, 0][valid[s, 0]] for s in range(steps[0])]
    assert (len(batches), int(expected[0])) == ((1, n) if n == 12 else (3, 13))
    assert n == 12 or not all(len(b) == len(batches[0]) for b in batches)  # Poisson: sizes vary
    theirs = opacus_steps(state, text, 20.0, x, y, batches, int(expected[0]), settings)
    for k in state:
        assert torch.allclose(stacked[k][0], theirs[k], atol=1e-6, rtol=0), (k, (stacked[k][0] - theirs[k]).abs().max())
        assert not torch.equal(stacked[k][0], state[k])


def test_the_clipping_bounds_each_rows_gradient_and_the_fast_path_computes_the_generic_engines_sums():
    """Ghost clipping (AttAI's fast path) gives the clipped sums that torch.func's per-sample gradients give,
    with clipping on and off; the noise then comes from each client's own generator, whatever the engine."""
    torch.manual_seed(1)
    d, C, B = 16, 4, 10
    text = torch.randn(C, d)
    x, y = torch.randn(2, B, d), torch.randint(0, C, (2, B))
    ok = torch.ones(2, B, dtype=torch.bool)
    ok[1, 7:] = False
    params = {k: v.unsqueeze(0).expand(2, *v.shape).clone() for k, v in AttAI().init(d, text).items()}
    for clip in (1e-3, 1e3):
        s = TrainSettings(lr=1e-3, loss="ce", dp=SampleDP(clip, 0.0))
        sets = ClientSets.of_tensors([x[0], x[1]], [y[0], y[1]])
        generic, fast = GenericTrainer(AttAI(), sets, text, 10.0, s), BatchedTrainer(AttAI(), sets, text, 10.0, s)
        generic.trained = fast.trained = frozenset(params)
        fast._moments(params)
        fast.prepare(params, x[None], y[None])
        loss_g, sums_g = generic.private_gradients(params, x, y, ok, 0, torch.ones(2))
        loss_f, sums_f = fast.private_gradients(params, x, y, ok, 0, torch.ones(2))
        assert torch.allclose(loss_g, loss_f, atol=1e-5)
        for k in params:
            assert torch.allclose(sums_g[k], sums_f[k], atol=1e-6, rtol=1e-4), (clip, k)
        norm = torch.stack([v.flatten(1).norm(dim=1) for v in sums_g.values()]).norm(dim=0)
        if clip < 1:  # every row's gradient is far above the clip: each contributes exactly `clip`
            assert (norm <= clip * ok.sum(1) + 1e-6).all()


@pytest.mark.parametrize("trained", ["all", "head", "body"])  # FedPer's step, FedRep's head and body phases
def test_ghost_clipping_under_a_linear_head_gives_the_generic_engines_sums(trained):
    from federate.heads import WithHead

    torch.manual_seed(4)
    d, C, B = 16, 5, 9
    text = torch.randn(C, d)
    x, y = torch.randn(2, B, d), torch.randint(0, C, (2, B))
    ok = torch.ones(2, B, dtype=torch.bool)
    ok[0, 6:] = False
    model = WithHead(AttAI())
    params = {k: v.unsqueeze(0).expand(2, *v.shape).clone() for k, v in model.init(d, text).items()}
    keys = {"all": set(params), "head": {"head.weight", "head.bias"},
            "body": {k for k in params if k.startswith("image.")}}[trained]
    s = TrainSettings(lr=1e-3, loss="ce", dp=SampleDP(0.01, 0.0))
    sets = ClientSets.of_tensors([x[0], x[1]], [y[0], y[1]])
    generic, fast = GenericTrainer(model, sets, text, 10.0, s), BatchedTrainer(model, sets, text, 10.0, s)
    generic.trained = fast.trained = frozenset(keys)
    fast._moments(params)
    fast.prepare(params, x[None], y[None])
    _, sums_g = generic.private_gradients(params, x, y, ok, 0, torch.full((2,), 0.5))
    _, sums_f = fast.private_gradients(params, x, y, ok, 0, torch.full((2,), 0.5))
    assert set(sums_g) == keys
    for k in keys:
        assert torch.allclose(sums_g[k], sums_f[k], atol=1e-6, rtol=1e-4), k


def test_noise_is_each_clients_own_and_has_the_right_scale():
    torch.manual_seed(2)
    d, C = 32, 3
    text = torch.randn(C, d)
    xs, ys = [torch.randn(n, d) for n in (50, 30)], [torch.randint(0, C, (n,)) for n in (50, 30)]
    init = AttAI().init(d, text)
    s = TrainSettings(lr=1.0, batch_size=10, loss="ce", weight_decay=0.0, dp=SampleDP(1e-9, 2.0))

    def train(sets_x, sets_y, seeds):
        st = {k: v.unsqueeze(0).expand(len(sets_x), *v.shape).clone() for k, v in init.items()}
        GenericTrainer(AttAI(), ClientSets.of_tensors(sets_x, sets_y), text, 5.0, s).train(
            st, 1, [torch.Generator().manual_seed(k) for k in seeds])
        return st

    both, alone = train(xs, ys, [3, 4]), train(xs[1:], ys[1:], [4])
    for k in init:  # client 1 trained alongside client 0 or alone: the same batches and noise
        assert torch.allclose(both[k][1], alone[k][0], atol=1e-6)
        assert not torch.allclose(both[k][0], both[k][1])


# --- accounting: Opacus' accountants, Flower's


def test_the_reported_epsilon_equals_opacus_accountants_for_the_same_sigma_q_steps_delta(planted_cache, tmp_path):
    from opacus.accountants import PRVAccountant, RDPAccountant

    s = run_federate(planted_cache, tmp_path / "r", "privacy=dpsgd", "privacy.noise_multiplier=1.3", "local_epochs=2",
                     rounds=3)
    rows = [json.loads(line) for line in (tmp_path / "r" / "history.jsonl").read_text().splitlines()]
    for r, row in enumerate(rows, 1):
        for name, eps in row["privacy"]["epsilon_clients"].items():
            n = s["clients"][name]["sizes"]["train"]
            b, q, _ = poisson_rate(n, 32)
            acc = RDPAccountant()
            acc.history = [(1.3, q, 2 * b * r)]
            assert eps == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
            assert s["privacy"]["sample_rates"][name] == q
        assert row["privacy"]["epsilon"] == max(row["privacy"]["epsilon_clients"].values())
        assert row["train_loss"] is None  # not private: it stays with the clients
    assert s["epsilon"] == rows[-1]["privacy"]["epsilon"] and s["delta"] == 1e-5
    prv = PRVAccountant()
    prv.history = [(1.1, 0.25, 40)]
    assert privacy.dpsgd_epsilon(1.1, ((0.25, 40),), 1e-5, "prv") == pytest.approx(prv.get_epsilon(delta=1e-5))
    assert privacy.dpsgd_epsilon(0.0, ((0.25, 40),), 1e-5, "rdp") == math.inf
    assert privacy.dpsgd_epsilon(1.0, (), 1e-5, "rdp") == 0.0


@pytest.mark.slow
def test_a_target_epsilon_gives_opacus_noise_and_keeps_every_client_within_it(planted_cache, tmp_path):
    from opacus.accountants.utils import get_noise_multiplier

    s = run_federate(planted_cache, tmp_path / "r", "privacy=dpsgd", "privacy.epsilon=4", "privacy.accountant=prv",
                     rounds=2)
    sigmas = []
    for name, c in s["clients"].items():
        b, q, _ = poisson_rate(c["sizes"]["train"], 32)
        sigmas.append(get_noise_multiplier(target_epsilon=4, target_delta=1e-5, sample_rate=q, steps=2 * b,
                                           accountant="prv", epsilon_tolerance=0.01))
    assert s["privacy"]["noise_multiplier"] == max(sigmas)
    assert 4 - 0.05 < s["epsilon"] <= 4 and all(e <= 4 for e in s["privacy"]["epsilon_clients"].values())


def test_a_run_that_would_exceed_its_epsilon_stops_before_training_and_says_what_to_change(planted_cache, tmp_path):
    line = refused(lambda: run_federate(planted_cache, tmp_path / "r", "privacy=dpsgd", "privacy.noise_multiplier=0.5",
                                        "privacy.epsilon=1", rounds=5), "privacy.noise_multiplier=0.5 spends epsilon",
                   "raise privacy.noise_multiplier to")
    assert "> privacy.epsilon=1" in line
    assert not (tmp_path / "r" / "history.jsonl").exists()
    refused(lambda: run_federate(planted_cache, tmp_path / "c", "privacy=dp_client", "privacy.noise_multiplier=0.3",
                                 "privacy.epsilon=1", rounds=5), "privacy.noise_multiplier=0.3 spends epsilon")
    refused(lambda: run_federate(planted_cache, tmp_path / "t", "privacy=dpsgd", "privacy.epsilon=1e-9", rounds=5),
            "cannot be met")


@pytest.mark.parametrize("overrides, match", [
    (["privacy=dpsgd"], "needs its noise: privacy.noise_multiplier"),
    (["privacy=dpsgd", "privacy.noise_multiplier=1", "loss=contrastive"], "use loss=ce"),
    (["privacy=dpsgd", "privacy.noise_multiplier=1", "engine=plain"], "engine=plain"),
    (["privacy=dpsgd", "privacy.noise_multiplier=-1"], "privacy.noise_multiplier must be >= 0"),
    (["privacy=dpsgd", "privacy.noise_multiplier=1", "privacy.max_grad_norm=0"], "privacy.max_grad_norm must be > 0"),
    (["privacy=dpsgd", "privacy.noise_multiplier=1", "privacy.delta=1"], "privacy.delta must be in (0, 1)"),
    (["privacy=dpsgd", "privacy.noise_multiplier=1", "privacy.accountant=gdp"], "privacy.accountant must be rdp or prv"),
    (["privacy=dpsgd", "privacy.noise_multiplier=1", "privacy.epsilon=0"], "privacy.epsilon must be > 0"),
    (["privacy=dpsgd", "privacy.noise_multiplier=1", "method=fedrod"], "method.gamma=0"),
    (["privacy=dpsgd", "privacy.noise_multiplier=1", "method=fedavg_full"], "trains the backbone on the images"),
    (["privacy=dpsgd", "privacy.noise_multiplier=1", "adapter=coop"], "adapter=coop's own engine"),
    (["privacy=dp_client", "privacy.noise_multiplier=1", "method=local"], "method=local sends nothing"),
    (["privacy=dp_client", "privacy.noise_multiplier=1", "method=central"], "method=central sends nothing"),
    (["privacy=dp_client", "privacy.noise_multiplier=1", "aggregation=samples"], "use aggregation=uniform"),
    (["privacy=dp_client", "privacy.noise_multiplier=1", "privacy.side=both"], "privacy.side must be server or client"),
    (["privacy=dp_client", "privacy.noise_multiplier=1", "privacy.clip_norm=0"], "privacy.clip_norm must be > 0"),
    (["privacy=dp_client", "privacy.noise_multiplier=1", "method=fedavg_full"], "trains the backbone on the images"),
])
def test_settings_that_cannot_give_their_guarantee_are_refused_in_one_line(planted_cache, tmp_path, overrides, match):
    refused(lambda: run_federate(planted_cache, tmp_path / "r", *overrides, rounds=2), match)


def test_a_fast_engine_asked_for_a_model_it_cannot_privatise_is_refused(planted_cache, tmp_path):
    refused(lambda: run_federate(planted_cache, tmp_path / "r", "privacy=dpsgd", "privacy.noise_multiplier=1",
                                 "method=apfl", "engine=sequential", rounds=1), "engine=sequential has DP-SGD for",
            "use engine=generic")
    refused(lambda: run_federate(planted_cache, tmp_path / "t", "privacy=dpsgd", "privacy.noise_multiplier=1",
                                 "text_adapter=true", "engine=batched", rounds=1), "engine=batched has DP-SGD for")


def test_a_method_that_trains_more_than_its_privacy_accounting_counts_is_stopped(planted_cache, tmp_path, monkeypatch):
    from federate.methods.fedavg import FedCLIP

    def greedy(self, train, shared, personal):  # two local updates a round, one counted
        train.train(shared, personal, send=False)
        return train.train(shared, personal)

    monkeypatch.setattr(FedCLIP, "local_update", greedy)
    refused(lambda: run_federate(planted_cache, tmp_path / "r", "privacy=dpsgd", "privacy.noise_multiplier=1", rounds=2),
            "round 1: the method trains 2 epochs on a client's rows, more than the 1 its privacy accounting counts")


METHODS = ["fedclip", "fedprox", "local", "central", "fedper", "fedrep", "fedbabu", "fedrod method.gamma=0", "ditto",
           "apfl"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_under_dpsgd_and_records_what_its_plan_counts(planted_cache, tmp_path, method):
    name, *extra = method.split()
    s = run_federate(planted_cache, tmp_path / "r", f"method={name}", *extra, "privacy=dpsgd",
                     "privacy.noise_multiplier=2", "clients_per_round=2" if name != "central" else "seed=0", rounds=2)
    rows = [json.loads(line) for line in (tmp_path / "r" / "history.jsonl").read_text().splitlines()]
    cfg = config("federate", [f"method={name}", *extra])
    train, deploy = methods.build(cfg.method).private_epochs(cfg)
    for name_, c in s["clients"].items():
        b, q, _ = poisson_rate(c["sizes"]["train"], 32)
        unit = name_ if s["method"] != "central" else "pooled"
        trained = sum(unit in row["sampled"] for row in rows)
        if s["method"] == "central":
            b, q, _ = poisson_rate(sum(x["sizes"]["train"] for x in s["clients"].values()), 32)
        expected = privacy.dpsgd_epsilon(2.0, ((q, trained * train * b + 2 * deploy * b),), 1e-5, "rdp")
        assert s["privacy"]["epsilon_clients"][name_] == pytest.approx(expected, rel=1e-12), name_
    assert s["epsilon"] > 0 and math.isfinite(s["overall"])


@pytest.mark.parametrize("adapter", ["clip_adapter", "linear_head"])
def test_other_adapters_train_under_dpsgd_with_the_generic_engine(planted_cache, tmp_path, adapter):
    s = run_federate(planted_cache, tmp_path / "r", f"adapter={adapter}", "privacy=dpsgd", "privacy.noise_multiplier=1",
                     rounds=2)
    assert s["engine"] == "auto" and s["epsilon"] > 0


def test_without_noise_dpsgd_learns_as_the_clipped_engines_say_and_epsilon_is_infinite(planted_cache, tmp_path):
    private = run_federate(planted_cache, tmp_path / "p", "privacy=dpsgd", "privacy.noise_multiplier=0",
                           "privacy.max_grad_norm=100", rounds=10)
    plain = run_federate(planted_cache, tmp_path / "n", "loss=ce", rounds=10)
    assert private["epsilon"] is None and private["privacy"]["epsilon"] is None  # infinite: JSON null
    assert private["overall"] > 0.5 and abs(private["overall"] - plain["overall"]) < 0.15


def test_fine_tuning_after_the_rounds_is_counted(planted_cache, tmp_path):
    s = run_federate(planted_cache, tmp_path / "r", "privacy=dpsgd", "privacy.noise_multiplier=1.5", "finetune_epochs=2",
                     rounds=2)
    for name, c in s["clients"].items():
        b, q, _ = poisson_rate(c["sizes"]["train"], 32)
        assert s["privacy"]["epsilon_clients"][name] == pytest.approx(
            privacy.dpsgd_epsilon(1.5, ((q, 4 * b),), 1e-5, "rdp"), rel=1e-12)


# --- DP-FedAvg


def flower_wrapper_mean(global_state, stacked, clip):
    """Flower's own DifferentialPrivacyServerSideFixedClipping (around its FedAvg), noise 0, on the same updates."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

    m = len(next(iter(stacked.values())))
    dp = DifferentialPrivacyServerSideFixedClipping(FlowerFedAvg(), noise_multiplier=0.0, clipping_norm=clip,
                                                    num_sampled_clients=m)
    dp.current_arrays = ArrayRecord.from_torch_state_dict(global_state)
    replies = []
    for i in range(m):
        content = RecordDict({"arrays": ArrayRecord.from_torch_state_dict({k: v[i] for k, v in stacked.items()}),
                              "metrics": MetricRecord({"num-examples": 10})})
        msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1 + i, message_type="train")
        replies.append(Message(content, reply_to=msg))
    arrays, _ = dp.aggregate_train(1, replies)
    return arrays.to_torch_state_dict()


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def client_ledger(sigma, clip, population=3, expected=3, rounds=5):
    cfg = config("federate", ["privacy=dp_client", f"privacy.noise_multiplier={sigma}", f"privacy.clip_norm={clip}"])
    return privacy.ClientLedger(cfg, population, expected, rounds)


def test_dp_fedavg_with_noise_zero_equals_flowers_server_side_clipping_wrapper(task_identity):
    torch.manual_seed(3)
    glob = {"a": torch.randn(20, 8), "b": torch.randn(8)}
    stacked = {k: v + torch.randn(4, *v.shape) * torch.tensor([0.01, 0.5, 1.0, 3.0]).view(-1, *[1] * v.dim())
               for k, v in glob.items()}
    ours = privacy.ClientLevelDP(FedAvg(), client_ledger(0.0, 1.0, 4, 4), seed=0)
    ours.start_round(1)
    mean = ours.aggregate_train(glob, stacked, [10, 20, 30, 40])
    theirs = flower_wrapper_mean(glob, stacked, 1.0)
    for k in glob:
        assert torch.allclose(mean[k], theirs[k], atol=1e-6, rtol=0)
    # each update scaled to norm <= C: the smallest passes as it is
    small = {k: v[:1] for k, v in stacked.items()}
    assert all(torch.allclose(ours.aggregate_train(glob, small, [1])[k], small[k][0] / 4 + glob[k] * 3 / 4, atol=1e-6)
               for k in glob)


def test_dp_fedavgs_noise_is_sigma_c_over_m_on_the_mean_seeded_by_round():
    glob = {"w": torch.zeros(200_000)}
    dp = privacy.ClientLevelDP(FedAvg(), client_ledger(2.0, 0.5, 10, 4), seed=1)
    dp.start_round(1)
    a = dp.aggregate_train(glob, {"w": torch.zeros(0, 200_000)}, [])["w"]  # a round that sampled no client
    assert float(a.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.01) and abs(float(a.mean())) < 1e-3
    assert torch.equal(a, dp.aggregate_train(glob, {"w": torch.zeros(0, 200_000)}, [])["w"])
    dp.start_round(2)
    assert not torch.equal(a, dp.aggregate_train(glob, {"w": torch.zeros(0, 200_000)}, [])["w"])


def test_dp_fedavgs_epsilon_is_flowers_accountant_over_the_rounds(planted_cache, tmp_path):
    from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                                   SamplingMethod)
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    s = run_federate(planted_cache, tmp_path / "r", "privacy=dp_client", "privacy.noise_multiplier=1.2",
                     "clients_per_round=2", rounds=4)
    rows = [json.loads(line) for line in (tmp_path / "r" / "history.jsonl").read_text().splitlines()]
    acc = RdpAccountant(PrivacyConfig(target_delta=1e-5, population_size=3, sampling_method=SamplingMethod.POISSON,
                                      neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE))
    for row in rows:
        acc.compose(GaussianPrivacyEvent(noise_multiplier=1.2, sample_size=2, population_size=3))
        assert row["privacy"]["epsilon"] == pytest.approx(acc.get_privacy_spent().epsilon, rel=1e-9)
    assert s["epsilon"] == rows[-1]["privacy"]["epsilon"] and s["privacy"]["expected_clients"] == 2
    assert s["strategy"]["name"] == "fedavg"
    sizes = [len(row["sampled"]) for row in rows]
    assert sizes == [len(privacy.poisson_sample(0, r, 3, 2 / 3)) for r in range(1, 5)]


def test_poisson_client_sampling_has_the_rate_and_depends_on_seed_and_round_only():
    counts = np.zeros(50)
    for r in range(1, 2001):
        for i in privacy.poisson_sample(7, r, 50, 0.1):
            counts[i] += 1
    assert counts.sum() / 2000 == pytest.approx(5, rel=0.05)
    assert privacy.poisson_sample(7, 3, 50, 0.1) == privacy.poisson_sample(7, 3, 50, 0.1)
    assert privacy.poisson_sample(7, 3, 50, 1.0) == list(range(50))


def test_dp_fedavg_wraps_strategies_that_read_the_mean_and_refuses_one_that_reads_each_client():
    class Robust(FedAvg):
        name = "robust"
        reads_each_client = True

    refused(lambda: privacy.ClientLevelDP(Robust(), client_ledger(1.0, 1.0), 0), "strategy=robust reads each client's")


def test_dp_fedavg_with_a_server_optimiser_and_a_personal_method(planted_cache, tmp_path):
    s = run_federate(planted_cache, tmp_path / "r", "privacy=dp_client", "privacy.noise_multiplier=0.1",
                     "privacy.clip_norm=1", "strategy=fedadam", "method=fedper", rounds=3)
    assert s["strategy"]["name"] == "fedadam" and s["epsilon"] > 0 and math.isfinite(s["overall"])


# --- Flower: the same numbers through the apps


def flower_grid():
    import test_flower

    return test_flower


@pytest.mark.parametrize("side", ["server", "client"])
def test_dp_fedavg_over_the_flower_apps_equals_the_in_process_run(tmp_path, side, monkeypatch):
    tf = flower_grid()
    from federate.flower import client_app
    from federate.flower.server_app import serve

    clipped = []

    def train_through_the_mod(msg, ctx):  # as the ClientApp calls it: through its mods (Flower's fixedclipping_mod)
        clipped.append("clipping_norm" in msg.content["config"])
        return client_app.clip_when_asked(msg, ctx, client_app.train)

    monkeypatch.setattr(tf, "client_train", train_through_the_mod)
    with monkeypatch.context() as m:
        from flwr.supercore.task_identity import TaskIdentity

        for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
            m.setattr(TaskIdentity, attr, value)
        domains, text = planted(tf.DOMAINS)
        cache = write_cache(tmp_path / "c.h5", domains, text)
        extra = ["privacy=dp_client", "privacy.noise_multiplier=0.7", "privacy.clip_norm=0.05", f"privacy.side={side}"]
        flower = serve(tf.FakeGrid(), tf.flower_cfg(cache, tmp_path / "f", *extra), tmp_path / "f")
        local = tf.in_process(cache, tmp_path / "l", 3, *extra)
    tf.same_results(flower, local)
    assert flower["epsilon"] == local["epsilon"]
    assert all(clipped) == (side == "client") and any(clipped) == (side == "client")


@pytest.mark.slow
def test_dpsgd_over_the_flower_apps_equals_the_in_process_run_and_clients_keep_their_loss(tmp_path, monkeypatch):
    tf = flower_grid()
    from federate.flower.server_app import serve
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    domains, text = planted(tf.DOMAINS)
    cache = write_cache(tmp_path / "c.h5", domains, text)
    sent = []

    def spy(domain, round_, kind, reply):
        if kind == "train":
            sent.append(dict(reply.content["metrics"]))
        return reply

    extra = ["privacy=dpsgd", "privacy.epsilon=6", "method=fedper"]
    flower = serve(tf.FakeGrid(spy), tf.flower_cfg(cache, tmp_path / "f", *extra), tmp_path / "f")
    local = tf.in_process(cache, tmp_path / "l", 3, *extra)
    tf.same_results(flower, local)
    assert flower["privacy"]["noise_multiplier"] == local["privacy"]["noise_multiplier"]
    assert flower["privacy"]["epsilon_clients"] == local["privacy"]["epsilon_clients"]
    assert sent and all("train_loss" not in m for m in sent)


# --- sweeps and resume


def test_a_grouped_sweep_of_dpsgd_points_writes_what_each_writes_alone(planted_cache, tmp_path):
    from conftest import outputs, same_outputs

    from federate import sweep

    cfgs = [config("federate", [f"cache_file={planted_cache}", "model.name=fedclip/planted", "target_domain=target",
                                "rounds=2", f"lr={lr}", "privacy=dpsgd", "privacy.noise_multiplier=1"])
            for lr in (1e-3, 3e-3)]
    assert sweep.groups(cfgs) == [[0, 1]]
    dirs = [tmp_path / "g0", tmp_path / "g1"]
    sweep.train_group(cfgs, dirs)
    from federate import prepared
    from federate.run import run

    for cfg, d in zip(cfgs, dirs):
        prepared.take(d)()
        run(cfg, tmp_path / f"alone-{d.name}")
        same_outputs(outputs(d), outputs(tmp_path / f"alone-{d.name}"))
    dp_client = config("federate", [f"cache_file={planted_cache}", "privacy=dp_client", "privacy.noise_multiplier=1"])
    assert sweep.group_key(dp_client) is None


# --- the report


def test_the_report_keeps_privacy_settings_apart_and_plots_accuracy_against_epsilon(planted_cache, tmp_path):
    from federate import report

    runs = tmp_path / "runs"
    for sigma in (0.6, 1.0, 3.0):
        run_federate(planted_cache, runs / f"s{sigma}", "privacy=dpsgd", f"privacy.noise_multiplier={sigma}", rounds=3)
    run_federate(planted_cache, runs / "plain", "loss=ce", rounds=3)
    run_federate(planted_cache, runs / "client", "privacy=dp_client", "privacy.noise_multiplier=1", rounds=3)
    text = report.report(runs)
    folder = next(p for p in (runs / "report").iterdir() if p.is_dir())
    rows = (folder / "privacy.csv").read_text().splitlines()
    assert rows[0].startswith("method,epsilon,delta,overall") and len(rows) == 5  # 3 DP-SGD points, 1 DP-FedAvg
    import csv

    table = list(csv.DictReader(rows))
    assert ["noise_multiplier=3.0" in table[0]["method"], "noise_multiplier=0.6" in table[2]["method"]] == [True, True]
    eps = [float(r["epsilon"]) for r in table[:3]]
    assert eps == sorted(eps) and "epsilon=None" not in rows[1]  # by epsilon; unset settings not shown
    overall = (folder / "overall.csv").read_text()
    assert overall.count("privacy=dpsgd") == 3 * 3 and "privacy=dp_client" in overall  # each its own column (x3: mean, se, n)
    assert "### Privacy and utility" in text
    pytest.importorskip("matplotlib")
    assert (folder / "privacy_utility.png").stat().st_size > 10_000
    curves, baselines = report.privacy_curves([report_runs_summary(p) for p in sorted(runs.glob("*/summary.json"))])
    (points, base), = [v for k, v in curves.items() if "dpsgd" in k]
    assert [p[0] for p in points] == sorted(p[0] for p in points) and base in baselines


def report_runs_summary(path):
    from federate.report_runs import read_run

    return read_run(path)


@pytest.mark.parametrize("overrides", [["privacy=dpsgd", "privacy.noise_multiplier=1.5", "clients_per_round=2"],
                                       ["privacy=dp_client", "privacy.noise_multiplier=0.5", "clients_per_round=2",
                                        "strategy=fedadam"]])
def test_an_interrupted_private_run_resumes_to_the_same_outputs_and_epsilon(planted_cache, tmp_path, monkeypatch,
                                                                            overrides):
    from conftest import outputs, same_outputs

    from federate.federation import Interrupted
    from federate.run import CachedBackend

    whole = tmp_path / "whole"
    run_federate(planted_cache, whole, *overrides, rounds=6)
    train = CachedBackend.train

    def interrupted(self, federation, round_, sampled):
        if round_ >= 4:
            raise KeyboardInterrupt
        return train(self, federation, round_, sampled)

    out = tmp_path / "cut"
    monkeypatch.setattr(CachedBackend, "train", interrupted)
    with pytest.raises(Interrupted):
        run_federate(planted_cache, out, *overrides, rounds=6)
    assert json.loads((out / "checkpoint.json").read_text())["privacy"]
    monkeypatch.setattr(CachedBackend, "train", train)
    run_federate(planted_cache, out, *overrides, rounds=6)
    same_outputs(outputs(whole), outputs(out))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["privacy=dp_client", "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.05",
                                    "privacy.side=client"],
                                   ["privacy=dpsgd", "privacy.epsilon=8", "method=fedper"]])
def test_private_runs_in_flowers_simulation_engine_give_the_in_process_numbers(tmp_path, extra):
    """`python -m federate backend=flower` (Ray, one SuperNode per client, the real ClientApp and its mods:
    Flower's fixedclipping_mod clips on the clients) equals the in-process run, noise included."""
    from conftest import run_cli

    tf = flower_grid()
    domains, text = planted(tf.DOMAINS)
    cache = write_cache(tmp_path / "c.h5", domains, text)
    out = tmp_path / "sim"
    proc = run_cli("federate", "backend=flower", f"cache_file={cache}", "model.name=fedclip/planted",
                   "target_domain=target", "rounds=3", "lr=1e-3", *extra, f"hydra.run.dir={out}", cwd=tmp_path,
                   timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    flower = json.loads((out / "summary.json").read_text())
    local = tf.in_process(cache, tmp_path / "l", 3, *extra)
    tf.same_results(flower, local)
    assert flower["backend"] == "flower" and flower["epsilon"] == local["epsilon"]


def test_a_dp_fedavg_target_gives_the_least_noise_within_it(planted_cache, tmp_path):
    s = run_federate(planted_cache, tmp_path / "r", "privacy=dp_client", "privacy.epsilon=20", "clients_per_round=2",
                     rounds=3)
    sigma = s["privacy"]["noise_multiplier"]
    assert 20 - 0.01 <= s["epsilon"] <= 20
    assert privacy.client_epsilon(sigma * 0.99, 3, 2, 3, 1e-5) > 20  # less noise would exceed it


def test_a_flower_client_that_sends_its_dpsgd_loss_is_dropped_and_one_without_the_noise_refuses(tmp_path, monkeypatch,
                                                                                                 caplog):
    tf = flower_grid()
    from flwr.app import MetricRecord
    from flwr.supercore.task_identity import TaskIdentity

    from federate.flower.server_app import serve

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    domains, text = planted(tf.DOMAINS)
    cache = write_cache(tmp_path / "c.h5", domains, text)

    def leak(domain, round_, kind, reply):
        if kind == "train" and domain == "alpha":
            reply.content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), "train_loss": 1.0})
        return reply

    s = serve(tf.FakeGrid(leak), tf.flower_cfg(cache, tmp_path / "f", "privacy=dpsgd", "privacy.noise_multiplier=1"),
              tmp_path / "f")
    assert "alpha" in s["dropped_clients"] and "train_loss was sent" in s["dropped_clients"]["alpha"]
    cfg = config("federate", ["privacy=dpsgd", "privacy.epsilon=3"])  # as a client would get it without the server's noise
    refused(lambda: privacy.client_settings(TrainSettings(lr=1e-3), cfg), "the server sent no privacy.noise_multiplier")
