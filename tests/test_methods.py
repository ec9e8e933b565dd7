"""Methods as algorithms (federate/methods/): the personalized-FL suite on the cache, each wired as its
paper says, and the numbers they give where theory says who wins."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import PLANTED_SIZES, config, outputs, run_federate, same_outputs
from planted import planted, write_cache
from safetensors.torch import load_file

from federate import methods
from federate.errors import ConfigError
from federate.federation import Interrupted
from federate.report_runs import read_run
from federate.report_select import reselect
from federate.run import CachedBackend, setup

PFL = ("fedper", "fedrep", "fedbabu", "fedrod", "ditto", "apfl")


@pytest.fixture(scope="module")
def skewed_cache(tmp_path_factory):
    """Noisy classes in three participating domains, for clients with few classes each (Dirichlet 0.1)."""
    domains, text = planted({"alpha": 600, "beta": 500, "gamma": 400, "target": 240}, noise=1.0, signal=0.4)
    return write_cache(tmp_path_factory.mktemp("skewed") / "planted.h5", domains, text)


SKEW = ("partition=dirichlet", "partition.alpha=0.1", "partition.clients_per_domain=4")


def point(cache, out, *overrides):
    """A set-up run (its rounds not run) and its in-process backend."""
    cfg = config("federate", [f"cache_file={cache}", "model.name=fedclip/planted", "target_domain=target", "lr=1e-3",
                              *overrides])
    out.mkdir(parents=True, exist_ok=True)
    p = setup(cfg, methods.build(cfg.method), out, progress=False)
    return p, CachedBackend(p)


def test_personal_heads_beat_one_shared_model_on_label_skewed_clients(skewed_cache, tmp_path):
    """Clients that see few classes each: a head of their own (FedPer, FedRep) or a personal model (Ditto)
    fits their label distribution, which one shared model cannot."""
    fedclip = run_federate(skewed_cache, tmp_path / "fedclip", *SKEW)["personalization_mean"]
    for name in ("fedper", "fedrep", "ditto"):
        s = run_federate(skewed_cache, tmp_path / name, *SKEW, f"method={name}")
        assert s["personalization_mean"] > fedclip + 0.2, (name, s["personalization_mean"], fedclip)


def test_fedper_shares_the_body_and_keeps_each_clients_head(planted_cache, tmp_path):
    p, backend = point(planted_cache, tmp_path, "method=fedper")
    fed = p.federation
    assert sorted(fed.global_state) == ["image.0.bias", "image.0.weight", "image.2.bias", "image.2.weight"]
    assert sorted(fed.personal) == ["head.bias", "head.weight"]
    update = backend.train(fed, 1, [0, 1, 2])
    assert set(update.stacked) == set(fed.global_state)  # a client sends its body only
    fed.end_round(1, [0, 1, 2], update, backend)
    heads = fed.personal["head.weight"]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    deployed = fed.method.deployed(backend.local_training(fed, 1, [0, 1, 2], "clients"), fed.global_state, fed.personal)
    for d in deployed:  # every client deploys the one shared body with its own head
        assert all(d[k] is fed.global_state[k] for k in fed.global_state)


def test_fedrep_trains_the_head_with_the_body_frozen_then_the_body_with_the_head_frozen(planted_cache, tmp_path):
    p, backend = point(planted_cache, tmp_path, "method=fedrep")
    fed = p.federation
    train = backend.local_training(fed, 1, [0, 1, 2])
    seen = []
    original = train.train

    def spy(shared, personal, **kw):
        before = {k: v.clone() for k, v in personal.items()}
        update = original(shared, personal, **kw)
        seen.append((kw, before, {k: v.clone() for k, v in personal.items()}, update))
        return update

    train.train = spy
    fed.method.local_update(train, fed.global_state, fed.personal)
    (head_kw, h0, h1, head_update), (body_kw, b0, b1, body_update) = seen
    assert head_kw["epochs"] == 4 and not head_kw["send"] and not head_update.stacked
    assert not torch.equal(h0["head.weight"], h1["head.weight"])  # the head epochs moved the heads
    assert all(torch.equal(b0[k], b1[k]) for k in b0)  # the body epochs did not
    assert set(body_update.stacked) == set(fed.global_state)
    assert not torch.equal(body_update.stacked["image.0.weight"][0], fed.global_state["image.0.weight"])


def test_fedbabu_never_moves_the_head_during_federation(planted_cache, tmp_path):
    s = run_federate(planted_cache, tmp_path, "method=fedbabu", rounds=4)
    saved = load_file(tmp_path / "adapter.safetensors")
    text = torch.nn.functional.normalize(torch.from_numpy(planted(PLANTED_SIZES)[1]).float(), dim=-1)
    for c in ("alpha", "beta", "gamma"):
        assert torch.equal(saved[f"{c}/head.weight"], text) and not saved[f"{c}/head.bias"].any()
    assert "head.weight" not in saved and s["shared_params"] == 2 * 64 * 64 + 2 * 64
    assert s["bytes_per_round"]["up"] == 3 * 4 * s["shared_params"]  # the frozen head is never sent


def test_fedbabus_clients_deploy_a_fine_tuned_model(planted_cache, tmp_path):
    p, backend = point(planted_cache, tmp_path, "method=fedbabu", "method.finetune_epochs=2")
    fed = p.federation
    train = backend.local_training(fed, 1, [0, 1, 2], "clients")
    deployed = fed.method.deployed(train, fed.global_state, fed.personal)
    for i, d in enumerate(deployed):
        assert not torch.equal(d["head.weight"], fed.personal["head.weight"][i])
        assert not torch.equal(d["image.0.weight"], fed.global_state["image.0.weight"])
    assert torch.equal(fed.personal["head.weight"][0], fed.method.initial["head.weight"])  # restored: never kept


def test_ditto_with_a_huge_lambda_deploys_the_global_model(planted_cache, tmp_path):
    """lambda -> inf pins each personal model to the global model w it received: the clients deploy FedAvg's
    model, to within the few Adam steps of lr that the data term takes before the pull undoes them (a
    weak pull lets the personal models go their own way)."""
    def gap(lam):
        p, backend = point(planted_cache, tmp_path / str(lam), "method=ditto", f"method.lambda={lam}",
                           "method.pers_epochs=5")
        fed = p.federation
        received = {k: v.clone() for k, v in fed.global_state.items()}
        backend.train(fed, 1, [0, 1, 2])
        return max(float((fed.personal[k] - received[k]).abs().max()) for k in received)

    strong, weak = gap(1e6), gap(0.0)
    assert strong <= 3e-3 and weak > 20 * strong, (strong, weak)  # lr 1e-3


def test_fedrod_predicts_with_both_heads_and_evaluates_the_target_with_the_generic_one(planted_cache, tmp_path):
    p, backend = point(planted_cache, tmp_path, "method=fedrod")
    fed = p.federation
    assert sorted(fed.personal) == ["phead.bias", "phead.weight"] and "head.weight" in fed.global_state
    (target,) = fed.method.target_models(fed.global_state, fed.personal)
    x = p.target_set.gather()[0]
    generic = p.adapter.head_logits(target, p.adapter.features(target, x), p.cache.logit_scale, ("head",))
    torch.testing.assert_close(p.adapter.logits(target, x, p.text, p.cache.logit_scale), generic)
    update = backend.train(fed, 1, [0, 1, 2])
    fed.end_round(1, [0, 1, 2], update, backend)
    assert not torch.equal(fed.personal["phead.weight"][0], fed.method.initial["phead.weight"])


def test_apfl_learns_each_clients_mixing_weight(planted_cache, tmp_path):
    p, backend = point(planted_cache, tmp_path, "method=apfl")
    fed = p.federation
    update = backend.train(fed, 1, [0, 1, 2])
    fed.end_round(1, [0, 1, 2], update, backend)
    alpha = fed.personal["alpha"]
    assert alpha.shape == (3,) and not torch.equal(alpha, torch.full((3,), 0.5)) and bool(((alpha >= 0) & (alpha <= 1)).all())
    p2, backend2 = point(planted_cache, tmp_path / "fixed", "method=apfl", "method.adaptive=false")
    update = backend2.train(p2.federation, 1, [0, 1, 2])
    assert torch.equal(p2.federation.personal["alpha"], torch.full((3,), 0.5))


@pytest.mark.parametrize("name", PFL)
def test_each_method_records_its_parts_and_what_it_sends(planted_cache, tmp_path, name):
    s = run_federate(planted_cache, tmp_path, f"method={name}", rounds=2)
    saved = load_file(tmp_path / "adapter.safetensors")
    plain = {k for k in saved if "/" not in k}
    per_client = {k.split("/", 1)[1] for k in saved if k.startswith("alpha/")}
    assert sum(saved[k].numel() for k in plain) == s["shared_params"]
    assert sum(saved[f"alpha/{k}"].numel() for k in per_client) == s["personal_params"]
    assert s["bytes_per_round"] == {"up": 3 * 4 * s["shared_params"], "down": 3 * 4 * s["shared_params"]}
    assert s["method_settings"]["name"] == name and s["loss"] == "ce"
    assert 0 <= s["personalization_mean"] <= 1 and 0 <= s["generalization"] <= 1


@pytest.mark.parametrize("name", ["fedper", "ditto", "apfl"])
def test_a_personal_method_resumes_to_the_same_outputs(planted_cache, tmp_path, monkeypatch, name):
    run_federate(planted_cache, tmp_path / "whole", f"method={name}", rounds=4)
    train = CachedBackend.train
    monkeypatch.setattr(CachedBackend, "train", lambda self, fed, r, s: (_ for _ in ()).throw(KeyboardInterrupt)
                        if r == 3 else train(self, fed, r, s))
    with pytest.raises(Interrupted):
        run_federate(planted_cache, tmp_path / "resumed", f"method={name}", rounds=4)
    monkeypatch.setattr(CachedBackend, "train", train)
    run_federate(planted_cache, tmp_path / "resumed", f"method={name}", rounds=4)
    same_outputs(outputs(tmp_path / "whole"), outputs(tmp_path / "resumed"))


def test_the_fast_path_trains_a_head_as_the_generic_engine_does(planted_cache, tmp_path):
    fast = run_federate(planted_cache, tmp_path / "fast", "method=fedrep", rounds=3)
    generic = run_federate(planted_cache, tmp_path / "generic", "method=fedrep", "engine=generic", rounds=3)
    a, b = load_file(tmp_path / "fast" / "adapter.safetensors"), load_file(tmp_path / "generic" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert fast["val_acc"] == pytest.approx(generic["val_acc"], abs=1e-6)


def test_sampled_clients_keep_their_personal_state_between_their_rounds(planted_cache, tmp_path):
    s = run_federate(planted_cache, tmp_path, "method=fedper", "partition=iid", "partition.clients_per_domain=2",
                     "clients_per_round=2", rounds=3)
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    trained = {c for row in history for c in row["sampled"]}
    saved = load_file(tmp_path / "adapter.safetensors")
    untouched = [c for c in s["clients"] if c not in trained]
    for c in untouched:  # never sampled: still the initial head
        assert torch.equal(saved[f"{c}/head.bias"], torch.zeros(5))
    assert any(saved[f"{c}/head.bias"].any() for c in trained)


@pytest.mark.parametrize("overrides, message", [
    (["method=fedper", "loss=contrastive"], "method=fedper trains a linear head with cross-entropy; use loss=ce"),
    (["method=fedrep", "method.head_epochs=-1"], "method.head_epochs must be an integer >= 0, not -1"),
    (["method=fedbabu", "method.finetune=body"], "method.finetune must be full or head, not 'body'"),
    (["method=ditto", "method.lambda=nan"], "method.lambda must be >= 0 and finite, not nan"),
    (["method=apfl", "method.alpha=2"], "method.alpha must be >= 0 and <= 1 and finite, not 2"),
    (["method=fedper", "adapter=coop"], "adapter coop cannot be the body of a method with a linear head"),
    (["method=fedper", "text_adapter=true"], "text_adapter=false"),
    (["method=local", "backend=flower"], "backend=flower runs methods whose clients communicate"),
    (["method=fedper", "+method.nope=1"], "method fedper: "),
])
def test_settings_a_method_cannot_take_are_one_line_errors(planted_cache, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        run_federate(planted_cache, tmp_path, *overrides, rounds=1)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_reports_reselection_gives_the_runs_own_overall(planted_cache, tmp_path):
    """With several clients per domain, overall is the mean of the target and the per-domain means, in
    summary.json and in the report's re-selection alike (one function computes both)."""
    s = run_federate(planted_cache, tmp_path, "partition=iid", "partition.clients_per_domain=3", rounds=3)
    again = reselect(read_run(tmp_path / "summary.json"), "val_mean")
    for key in ("overall", "personalization_mean", "generalization", "best_round", "personalization_domains"):
        assert again[key] == s[key], key


def test_one_batch_clients_of_fedper_are_folded_as_they_train_alone(planted_cache, tmp_path, monkeypatch):
    """Many small clients (one batch a round) train together on the CPU (engine=auto: their body's
    activations at once, each head stepped in place): the same models as the lock-step engine gives them."""
    from federate.engine import BatchedTrainer

    calls, fold = [], BatchedTrainer.fold_first_steps
    monkeypatch.setattr(BatchedTrainer, "fold_first_steps", lambda self, *a, **k: calls.append(1) or fold(self, *a, **k))
    many = ("method=fedper", "partition=iid", "partition.clients_per_domain=12")
    folded = run_federate(planted_cache, tmp_path / "auto", *many, rounds=3)
    assert len(calls) == 3
    lockstep = run_federate(planted_cache, tmp_path / "batched", *many, "engine=batched", rounds=3)
    a, b = load_file(tmp_path / "auto" / "adapter.safetensors"), load_file(tmp_path / "batched" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert folded["val_acc"] == pytest.approx(lockstep["val_acc"], abs=1e-6)
    assert min(c["sizes"]["train"] for c in folded["clients"].values()) <= 32  # (they are one-batch clients)


def test_the_report_tabulates_each_personal_method_as_its_own_row(planted_cache, tmp_path):
    from federate.report import report

    for i, overrides in enumerate([["method=fedper"], ["method=fedper", "seed=1"], ["method=fedrep"],
                                   ["method=fedrep", "method.head_epochs=2"], ["method=ditto"]]):
        run_federate(planted_cache, tmp_path / str(i), *overrides, rounds=2)
    text = report(tmp_path, make_plots=False)
    assert "fedper (loss=ce, rounds=2)" in text and "(2)" in text  # two seeds, one row
    assert "fedrep (head_epochs=4, loss=ce, rounds=2)" in text and "fedrep (head_epochs=2, loss=ce, rounds=2)" in text
    assert "ditto (pers_epochs=1, lambda=1.0, loss=ce, rounds=2)" in text
