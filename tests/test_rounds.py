"""The round loop's contract (federate/federation.py): client sampling, every metric every round, model
selection after the fact, fp32 evaluation, runs without a target domain, summary.json's client fields."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import run_federate
from safetensors.torch import load_file

from federate import selection
from federate.adapters import attai
from federate.errors import ConfigError
from federate.federation import sample


def history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_a_sample_depends_only_on_the_seed_and_the_round():
    assert sample(0, 3, 10, 4) == sample(0, 3, 10, 4) and len(set(sample(0, 3, 10, 4))) == 4
    assert sample(0, 3, 10, 4) == sorted(sample(0, 3, 10, 4))
    assert len({tuple(sample(0, r, 10, 4)) for r in range(20)}) > 10
    assert sample(0, 3, 10, None) == sample(0, 3, 10, 10) == list(range(10))


def test_sampled_rounds_train_and_average_only_the_sampled_clients_and_evaluate_all(planted_cache, tmp_path):
    s = run_federate(planted_cache, tmp_path / "a", "clients_per_round=2", "aggregation=samples", rounds=6)
    rows = history(tmp_path / "a")
    for r in rows:
        assert len(r["sampled"]) == 2 and set(r["train_loss"]) == set(r["sampled"])
        assert set(r["val_acc"]) == set(r["test_acc"]) == {"alpha", "beta", "gamma"} and r["target_acc"] is not None
    assert len({tuple(r["sampled"]) for r in rows}) > 1 and s["clients_per_round"] == 2
    per_client = 4 * s["trainable_params"]  # what crosses the wire: the sampled clients' adapters only
    assert s["bytes_per_round"] == {"up": 2 * per_client, "down": 2 * per_client}
    again = run_federate(planted_cache, tmp_path / "b", "clients_per_round=2", "aggregation=samples", rounds=6)
    assert [r["sampled"] for r in history(tmp_path / "b")] == [r["sampled"] for r in rows]
    assert again["overall"] == s["overall"]
    # all clients sampled is the default run
    full = run_federate(planted_cache, tmp_path / "c", "clients_per_round=3", rounds=3)
    default = run_federate(planted_cache, tmp_path / "d", rounds=3)
    assert full["overall"] == default["overall"] and full["best_round"] == default["best_round"]


def test_fedavg_weights_the_sampled_clients_only(planted_cache, tmp_path):
    """One round with one sampled client: the global adapter is that client's own (weight 1)."""
    run_federate(planted_cache, tmp_path / "one", "clients_per_round=1", rounds=1)
    trained = history(tmp_path / "one")[0]["sampled"]
    assert len(trained) == 1
    run_federate(planted_cache, tmp_path / "solo", "method=local", rounds=1)  # each client's own adapter
    glob = load_file(tmp_path / "one" / "adapter.safetensors")
    own = load_file(tmp_path / "solo" / "adapter.safetensors")
    for k, v in glob.items():
        torch.testing.assert_close(v, own[f"{trained[0]}/{k}"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("m", ["0", "4", "-1"])
def test_a_bad_clients_per_round_is_one_line(planted_cache, tmp_path, m):
    with pytest.raises(ConfigError, match=rf"clients_per_round must be between 1 and the number of clients \(3\), not {m}"):
        run_federate(planted_cache, tmp_path, f"clients_per_round={m}", rounds=1)


def test_every_round_records_every_metric_and_selection_happens_after(planted_cache, tmp_path):
    rows = None
    for rule in selection.RULES:
        s = run_federate(planted_cache, tmp_path / rule, f"selection={rule}", rounds=5)
        got = history(tmp_path / rule)
        if rows is None:
            rows = got
            assert all({"val_acc", "test_acc", "target_acc", "val_mean", "val_rows", "sampled"} <= set(r) for r in rows)
        assert [{k: r[k] for k in ("val_acc", "test_acc", "target_acc")} for r in got] == \
            [{k: r[k] for k in ("val_acc", "test_acc", "target_acc")} for r in rows]  # selection changes no number
        best = selection.select(rows, rule)
        assert s["best_round"] == best["round"] and s["selection"] == rule
        assert s["generalization"] == best["target_acc"] and s["personalization"] == best["test_acc"]
    assert "upper bound" in s["selection_label"]


def test_summary_reports_clients_domains_spread_partition_and_identity(planted_cache, tmp_path):
    s = run_federate(planted_cache, tmp_path, rounds=4)
    test = s["personalization"]
    assert s["clients"]["beta"] == {"domain": "beta", "val": s["val_acc"]["beta"], "test": test["beta"],
                                    "sizes": s["split_sizes"]["beta"]}
    assert s["personalization_domains"] == test  # one client per domain
    values = list(test.values())
    assert s["personalization_spread"] == {"mean": pytest.approx(np.mean(values)), "worst": min(values),
                                           "p10": pytest.approx(np.percentile(values, 10))}
    assert s["overall"] == pytest.approx(np.mean([s["generalization"], *values]))
    assert s["partition"]["name"] == "domain" and s["clients_per_round"] is None and s["selection"] == "val_mean"
    assert len(s["cache_identity_sha256"]) == 64 and "domains/alpha/image_embeddings" in s["cache_checksums"]
    assert s["splits_sha256"] == hashlib.sha256((tmp_path / "splits.json").read_bytes()).hexdigest()


def test_target_domain_none_trains_every_domain_and_reports_no_generalization(planted_cache, tmp_path):
    s = run_federate(planted_cache, tmp_path, "target_domain=none", rounds=3)
    assert s["target_domain"] is None and s["generalization"] is None and s["target_size"] is None
    assert set(s["personalization"]) == {"alpha", "beta", "gamma", "target"}
    assert s["overall"] == pytest.approx(np.mean(list(s["personalization"].values())))
    assert all(r["target_acc"] is None for r in history(tmp_path))
    with pytest.raises(ConfigError, match="selection=oracle .* no target domain"):
        run_federate(planted_cache, tmp_path / "o", "target_domain=none", "selection=oracle", rounds=1)


def test_evaluation_is_fp32_when_training_is_bf16(planted_cache, tmp_path, monkeypatch):
    """bf16 would flip some predictions for the same weights; the fast path's training never calls logits."""
    calls = []
    logits = attai.AttAI.logits

    def spy(self, params, x, text, scale):
        calls.append(torch.is_autocast_enabled(x.device.type))
        return logits(self, params, x, text, scale)

    monkeypatch.setattr(attai.AttAI, "logits", spy)
    run_federate(planted_cache, tmp_path, "precision=bf16", rounds=2)
    assert calls and not any(calls)


def test_a_batch_larger_than_every_client_is_one_batch_of_all_its_rows(planted_cache, tmp_path):
    """The engines pad batches to batch_size: uncapped, 10**9 would allocate tens of GB."""
    huge = run_federate(planted_cache, tmp_path / "huge", "batch_size=1000000000", rounds=2)
    largest = run_federate(planted_cache, tmp_path / "largest", "batch_size=156", rounds=2)  # alpha's training rows
    assert [r["train_loss"] for r in history(tmp_path / "huge")] == [r["train_loss"] for r in history(tmp_path / "largest")]
    assert huge["overall"] == largest["overall"] and huge["batch_size"] == 1000000000
