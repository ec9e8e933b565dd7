"""Methods that send statistics of their features (federate/methods/fedproto.py, ccvr.py, fedpft.py; the
math in federate/features.py and federate/mixtures.py): their numbers against hand computations,
scikit-learn and the Flower baseline's FedPFT, what they send, and their runs under every setting."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import config, outputs, run_federate, same_outputs
from planted import planted, write_cache
from safetensors.torch import load_file

from federate import features as feats
from federate import mixtures
from federate.adapters import init_params
from federate.errors import ConfigError
from federate.experiment import check_settings
from federate.federation import Interrupted
from federate.methods.fedpft import FeatureHead, batch_generator, sample_generator
from federate.report_runs import read_run
from federate.report_select import reselect
from federate.run import CachedBackend, setup


def point(cache, out, *overrides):
    """A set-up run (its rounds not run, its method's settings checked) and its in-process backend."""
    cfg = config("federate", [f"cache_file={cache}", "model.name=fedclip/planted", "target_domain=target", "lr=1e-3",
                              *overrides])
    out.mkdir(parents=True, exist_ok=True)
    p = setup(cfg, check_settings(cfg), out, progress=False)
    return p, CachedBackend(p)


# --- the math


@pytest.mark.parametrize("covariance", mixtures.COVARIANCES)
@pytest.mark.parametrize("components", [1, 2, 3])
def test_mixtures_equal_scikit_learns_gaussian_mixture(covariance, components):
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(components)
    x = np.concatenate([rng.normal(0, 1, (50, 5)), rng.normal(2.5, 0.5, (30, 5)), rng.normal(-2, 0.3, (20, 5))])
    ref = GaussianMixture(components, covariance_type=covariance, random_state=3, tol=1e-12, max_iter=10000).fit(x)
    got = mixtures.fit(torch.from_numpy(x), components, covariance, seed=3)
    for name, theirs in (("weights", ref.weights_), ("means", ref.means_), ("covariances", ref.covariances_)):
        np.testing.assert_allclose(getattr(got, name).numpy(), theirs, rtol=1e-9, atol=1e-12, err_msg=name)
    assert float(mixtures.log_likelihood(torch.from_numpy(x), got)) == pytest.approx(ref.score(x), rel=1e-9)


def test_a_mixture_samples_its_parameters():
    g = torch.Generator().manual_seed(0)
    m = mixtures.Mixture(torch.tensor([0.25, 0.75], dtype=torch.float64), torch.tensor([[0.0, 0.0], [12.0, 12.0]]),
                         torch.tensor([[1.0, 4.0], [0.25, 0.25]]), "diag")
    x = mixtures.sample(m, 40000, g)
    far = x[:, 0] > 6
    assert float(far.double().mean()) == pytest.approx(0.75, abs=0.01)
    torch.testing.assert_close(x[far].var(0), torch.tensor([0.25, 0.25], dtype=torch.float64), atol=0.01, rtol=0)
    torch.testing.assert_close(x[~far].var(0), torch.tensor([1.0, 4.0], dtype=torch.float64), atol=0.1, rtol=0)


def test_pooled_moments_equal_the_moments_of_all_rows():
    """CCVR's server pools the clients' (count, mean, unbiased covariance) exactly, whatever their order."""
    g = torch.Generator().manual_seed(1)
    parts = [(torch.randn(n, 3, generator=g, dtype=torch.float64) + i, torch.randint(0, 2, (n,), generator=g))
             for i, n in enumerate((9, 1, 14))]
    moments = []
    for x, y in parts:  # what each client sends: count, mean and unbiased covariance per class
        count = torch.tensor([float((y == c).sum()) for c in (0, 1)])
        mean = torch.stack([x[y == c].mean(0) if count[c] else torch.zeros(3, dtype=torch.float64) for c in (0, 1)])
        cov = torch.stack([torch.cov(x[y == c].T) if count[c] >= 2 else torch.zeros(3, 3, dtype=torch.float64)
                           for c in (0, 1)])
        moments.append(feats.Moments.of(count, mean, cov))
    stacked = feats.Moments(*(torch.stack([getattr(m, k) for m in moments]) for k in ("count", "mean", "m2")))
    pooled = feats.pool(stacked)
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    for c in (0, 1):
        torch.testing.assert_close(pooled.mean[c], x[y == c].mean(0))
        torch.testing.assert_close(pooled.covariance()[c], torch.cov(x[y == c].T))
    assert pooled.count.tolist() == [float((y == 0).sum()), float((y == 1).sum())]


def test_a_linear_head_trains_as_torchs_dataloader_and_optimiser_train_it():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(70, 6, generator=g), torch.randint(0, 4, (70,), generator=g)
    head = torch.nn.Linear(6, 4)
    W, b = feats.train_linear(head.weight, head.bias, x, y, epochs=3, batch_size=16,
                              generator=torch.Generator().manual_seed(5),
                              optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), scale=2.0)
    loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(5))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(3):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(2.0 * head(xb), yb).backward()
            opt.step()
    torch.testing.assert_close(W, head.weight.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b, head.bias.detach(), atol=1e-6, rtol=1e-5)


# --- FedProto


def attai_features(state, x):
    """normalise(g(x) * x), g = softmax(W2 tanh(W1 x + b1) + b2): AttAI and the head's input, by hand."""
    h = torch.tanh(x @ state["image.0.weight"].T + state["image.0.bias"])
    g = torch.softmax(h @ state["image.2.weight"].T + state["image.2.bias"], dim=-1)
    return F.normalize(g * x, dim=-1)


def test_fedprotos_prototypes_are_each_clients_class_means_and_the_server_weighs_them(planted_cache, tmp_path):
    """A client's prototypes are the mean features of each class over its local epochs' batches (here lr is
    so small that its model does not move, so they are the means of its rows' features under its model);
    the server's are their mean weighted by rows."""
    p, backend = point(planted_cache, tmp_path, "method=fedproto", "lr=1e-12", "local_epochs=2")
    fed = p.federation
    assert sorted(fed.global_state) == ["proto.count", "proto.mean"] and "head.weight" in fed.personal
    before = {k: v.clone() for k, v in fed.personal.items()}
    update = backend.train(fed, 1, [0, 1, 2])
    sums, rows = torch.zeros(5, 64), torch.zeros(5)
    for i, client in enumerate(p.clients):
        x, y = client.train.gather()
        f = attai_features({k: v[i] for k, v in before.items()}, x)
        for c in range(5):
            mine = f[y == c]
            assert float(update.stacked["proto.count"][i, c]) == len(mine)  # rows, not rows x epochs
            if len(mine):
                torch.testing.assert_close(update.stacked["proto.mean"][i, c], mine.mean(0), atol=1e-6, rtol=1e-5)
                sums[c] += mine.sum(0)
                rows[c] += len(mine)
    fed.end_round(1, [0, 1, 2], update, backend)
    torch.testing.assert_close(fed.global_state["proto.mean"], sums / rows[:, None], atol=1e-6, rtol=1e-5)
    assert fed.global_state["proto.count"].tolist() == rows.tolist()


def test_fedprotos_uniform_weighting_is_the_mean_over_the_clients_that_hold_the_class(planted_cache, tmp_path):
    p, backend = point(planted_cache, tmp_path, "method=fedproto", "method.weighting=uniform")
    update = backend.train(p.federation, 1, [0, 1, 2])
    got = p.federation.method.aggregate(None, p.federation.global_state, update)
    held = update.stacked["proto.count"] > 0
    expected = (update.stacked["proto.mean"] * held[..., None]).sum(0) / held.sum(0)[:, None]
    torch.testing.assert_close(got["proto.mean"], expected)


def test_the_fast_path_pulls_features_towards_the_prototypes_as_autograd_does(planted_cache, tmp_path):
    p, _ = point(planted_cache, tmp_path, "method=fedproto", "method.lambda=3")
    model = p.adapter
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(2, 6, 64, generator=g), dim=-1).requires_grad_(True)
    y = torch.tensor([[0, 1, 2, 3, 4, 0], [1, 1, 2, 2, 0, 4]])
    ok = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    params = {"proto.mean": torch.randn(2, 5, 64, generator=g),
              "proto.count": torch.tensor([[3.0, 0, 2, 1, 1], [1.0] * 5])}
    loss, grad = model.feature_grad(params, f.detach(), y, ok)
    for k in range(2):
        expected = model.pull({q: v[k] for q, v in params.items()}, f[k], y[k], ok[k])
        assert float(loss[k]) == pytest.approx(float(expected.detach()), rel=1e-6)
        (auto,) = torch.autograd.grad(expected, f)
        torch.testing.assert_close(grad[k], auto[k])
    updates = []
    for engine in ("auto", "generic"):  # the prototypes summed as each engine trains
        p, backend = point(planted_cache, tmp_path / f"point_{engine}", "method=fedproto", f"engine={engine}")
        p.federation.global_state = {"proto.mean": params["proto.mean"][0], "proto.count": params["proto.count"][0]}
        updates.append(backend.train(p.federation, 1, [0, 1, 2]).stacked)
    for key in ("proto.mean", "proto.count"):
        torch.testing.assert_close(updates[0][key], updates[1][key], atol=1e-5, rtol=1e-4)
    a = run_federate(planted_cache, tmp_path / "fast", "method=fedproto", rounds=3)
    b = run_federate(planted_cache, tmp_path / "generic", "method=fedproto", "engine=generic", rounds=3)
    sa, sb = (load_file(tmp_path / run / "adapter.safetensors") for run in ("fast", "generic"))
    assert sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)
    assert a["val_acc"] == pytest.approx(b["val_acc"], abs=1e-6)


def test_fedprotos_lambda_pulls_the_clients_features_together(planted_cache, tmp_path):
    """With a strong pull, each client's prototypes end nearer the global ones than without it."""
    def spread(lam):
        p, backend = point(planted_cache, tmp_path / str(lam), "method=fedproto", f"method.lambda={lam}")
        fed = p.federation
        for r in (1, 2, 3):
            update = backend.train(fed, r, [0, 1, 2])
            fed.global_state = fed.method.aggregate(None, fed.global_state, update)
        return float((update.stacked["proto.mean"] - fed.global_state["proto.mean"]).norm(dim=-1).mean())

    assert spread(1e4) < 0.8 * spread(0.0)


# --- CCVR


def test_ccvr_calibrates_only_the_head_of_the_selected_model_and_records_both(planted_cache, tmp_path):
    p, backend = point(planted_cache, tmp_path / "p", "method=ccvr", "rounds=3")
    fed = p.federation
    steps, seen = fed.steps(backend), []
    request = next(steps)
    try:
        while True:
            if request[0] == "calibration":
                seen.append({k: v.clone() for k, v in fed.global_state.items()})
                assert request[1] == [0, 1, 2]
            request = steps.send(backend.train(fed, *request))
    except StopIteration:
        pass
    fed.runlog.close()
    (selected,) = seen
    for k, v in fed.global_state.items():
        assert torch.equal(v, selected[k]) != k.startswith("head."), k  # the body untouched, the head moved
    s = run_federate(planted_cache, tmp_path / "run", "method=ccvr", rounds=3)
    before = s["before_calibration"]
    assert s["after_rounds"] == "calibration" and before["best_round"] == s["best_round"]
    assert before["personalization_mean"] != s["personalization_mean"]
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    row = next(r for r in history if r["round"] == s["best_round"])
    assert before["personalization"] == row["test_acc"] and before["val_mean"] == row["val_mean"]
    assert reselect(read_run(tmp_path / "run" / "summary.json"), "last") is None  # history cannot tell


def test_ccvr_sends_each_classs_count_mean_and_covariance_once(planted_cache, tmp_path):
    s = run_federate(planted_cache, tmp_path, "method=ccvr", rounds=2)
    weights = 4 * s["shared_params"]
    stats = 4 * (5 + 5 * 64 + 5 * 64 * 64)
    assert s["bytes_per_round"] == {"up": 3 * weights, "down": 3 * weights}
    assert s["bytes_after_rounds"] == {"up": 3 * stats, "down": 3 * weights}
    assert s["bytes_total"] == {"up": 2 * 3 * weights + 3 * stats, "down": 3 * 3 * weights}


def test_ccvrs_virtual_features_follow_the_pooled_gaussians(planted_cache, tmp_path):
    p, backend = point(planted_cache, tmp_path, "method=ccvr", "method.virtual_per_class=4000")
    fed = p.federation
    update = backend.train(fed, "calibration", [0, 1, 2])
    pooled = feats.Moments.of(*(update.stacked[k][0] for k in ("ccvr.count", "ccvr.mean", "ccvr.covariance")))
    f = torch.cat([attai_features(fed.global_state, c.train.gather()[0]) for c in p.clients])
    y = torch.cat([c.train.labels for c in p.clients])
    sent = [feats.class_moments(p.adapter, fed.global_state, [c.train], 5) for c in p.clients]  # each client's
    wire = feats.Moments.of(*(torch.stack([getattr(m, k)().float() if k == "covariance" else getattr(m, k).float()
                                           for m in sent]) for k in ("count", "mean", "covariance")))
    by_server = feats.pool(wire)  # what the server makes of the clients' float32 messages
    for c in range(5):
        torch.testing.assert_close(pooled.mean[c].float(), f[y == c].mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(pooled.covariance()[c].float(), torch.cov(f[y == c].T), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(by_server.covariance()[c], pooled.covariance()[c], atol=1e-8, rtol=1e-5)
        x = feats.gaussian_rows(pooled.mean[c], pooled.covariance()[c], 4000, torch.Generator().manual_seed(c))
        assert float((x.mean(0) - pooled.mean[c]).abs().max()) < 0.01


# --- FedPFT


def client_rows(out, cache):
    """Each client's (train, test) rows as float64 features and labels, in the run's client order."""
    import h5py

    summary = json.loads((out / "summary.json").read_text())
    splits = json.loads((out / "splits.json").read_text())
    rows = {}
    with h5py.File(cache) as f:
        for name in summary["clients"]:
            parts = []
            for part in ("train", "test"):
                domain = splits[name][part][0].split("/")[0]
                index = [int(i.split("/")[1]) for i in splits[name][part]]
                parts.append((f[f"domains/{domain}/image_embeddings"][:][index].astype(np.float64),
                              f[f"domains/{domain}/labels"][:][index]))
            rows[name] = parts
    return summary, rows


@pytest.fixture(scope="module")
def skewed_cache(tmp_path_factory):
    domains, text = planted({"alpha": 300, "beta": 260, "gamma": 220}, noise=0.6, signal=0.5, style=1.0)
    return write_cache(tmp_path_factory.mktemp("skewed") / "planted.h5", domains, text)


def test_fedpft_trains_the_head_the_flower_baseline_trains(skewed_cache, tmp_path):
    """The baseline's recipe (tests/fedpft_reference.py, from its code) on the same features and partition
    (Dirichlet 0.1, classes of one row on a client dropped): on the same random draws, the same head to
    float noise; on its own random draws, the same accuracy to within sampling noise."""
    import fedpft_reference as flower

    run_federate(skewed_cache, tmp_path, "method=fedpft", "target_domain=none", "partition=dirichlet",
                 "partition.alpha=0.1", "partition.clients_per_domain=4", "lr=1e-4")  # the baseline's recipe
    summary, rows = client_rows(tmp_path, skewed_cache)
    train = [rows[c][0] for c in summary["clients"]]
    tests = [rows[c][1] for c in summary["clients"]]
    assert any((np.bincount(y) == 1).any() for _, y in train)  # (classes of one row, which are dropped)
    text = torch.zeros(5, 64)
    init = init_params(FeatureHead(), 64, 0, text)
    draws = sample_generator(0)
    head, sent = flower.server_head(train, 5, init=(init["head.weight"], init["head.bias"]),
                                    draws=lambda n, d: torch.randn(n, d, generator=draws).double().numpy(),
                                    shuffle=batch_generator(0))
    saved = load_file(tmp_path / "adapter.safetensors")
    torch.testing.assert_close(saved["head.weight"], head.weight.detach(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(saved["head.bias"], head.bias.detach(), atol=2e-5, rtol=1e-4)
    n = sum(len(y) for _, y in tests)
    ours = sum(summary["clients"][c]["test"] * summary["clients"][c]["sizes"]["test"] for c in summary["clients"]) / n
    assert flower.pooled_accuracy(head, tests) == pytest.approx(ours, abs=1 / n)
    # what the clients sent: the baseline's float16 mixtures, class for class
    p, backend = point(skewed_cache, tmp_path / "again", "method=fedpft", "target_domain=none", "partition=dirichlet",
                       "partition.alpha=0.1", "partition.clients_per_domain=4")
    update = backend.train(p.federation, 1, list(range(len(p.clients))))
    for i, gmms in enumerate(sent):
        labels = [g["label"] for g in gmms]
        assert torch.nonzero(update.stacked["gmm.count"][i]).flatten().tolist() == labels
        for g in gmms:
            c = g["label"]
            assert float(update.stacked["gmm.count"][i, c]) == g["num_samples"]
            for key, theirs in (("means", g["means"]), ("covariances", g["covariances"]), ("weights", g["weights"])):
                ours16 = update.stacked[f"gmm.{key}"][i, c].numpy()
                assert np.abs(ours16.astype(np.float64) - theirs.astype(np.float64)).max() <= \
                    2 * np.abs(np.spacing(theirs)).max(), (i, c, key)
    their_head, _ = flower.server_head(train, 5, torch_seed=0)
    assert flower.pooled_accuracy(their_head, tests) == pytest.approx(ours, abs=0.05)


def test_fedpft_on_gaussian_classes_is_within_a_few_points_of_central(tmp_path):
    """Classes that are Gaussian clusters: the mixtures describe the data, so a head trained on synthetic
    embeddings does about as well on the held-out domain as a model trained on the pooled real rows."""
    domains, text = planted({"alpha": 500, "beta": 500, "gamma": 500, "target": 500}, noise=0.5, signal=0.4, style=0.0)
    cache = write_cache(tmp_path / "clusters.h5", domains, text)
    fedpft = run_federate(cache, tmp_path / "fedpft", "method=fedpft")
    central = run_federate(cache, tmp_path / "central", "method=central")
    assert 0.8 < central["generalization"] < 0.99
    assert fedpft["generalization"] == pytest.approx(central["generalization"], abs=0.03)


def test_fedpft_is_one_round_and_sends_float16_mixtures_and_gets_the_head(planted_cache, tmp_path):
    s = run_federate(planted_cache, tmp_path / "sph", "method=fedpft", rounds=7)
    assert s["rounds"] == 1 and s["best_round"] == 1
    assert s["bytes_per_round"] == {"up": 3 * (2 * (5 * 64 + 5 + 5) + 4 * 5), "down": 3 * 4 * (5 * 64 + 5)}
    assert s["bytes_total"] == s["bytes_per_round"]
    assert s["method_settings"] == {"name": "fedpft", "components": 1, "covariance": "spherical",
                                    "samples_per_class": None, "head_epochs": 50}
    full = run_federate(planted_cache, tmp_path / "full", "method=fedpft", "method.covariance=full",
                        "method.components=2", "method.samples_per_class=100", "method.head_epochs=5")
    assert full["bytes_per_round"]["up"] == 3 * (2 * (5 * 2 * 64 + 5 * 2 * 64 * 64 + 5 * 2) + 4 * 5)
    assert 0.5 < full["personalization_mean"] <= 1


def test_fedpft_shares_samples_per_class_out_by_the_clients_rows():
    from federate.methods.fedpft import FedPFT

    m = FedPFT(samples_per_class=10)
    per = m.allocation(torch.tensor([[3.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
    assert per.sum(0).tolist() == [10, 0, 10] and per[:, 0].tolist() == [8, 2, 0] and per[:, 2].tolist() == [4, 3, 3]
    assert FedPFT().allocation(torch.tensor([[3.0, 2.0]])).tolist() == [[3, 2]]


def test_fedpft_fits_fewer_components_to_a_class_with_few_rows_and_skips_one_row(caplog):
    from federate.methods.fedpft import FedPFT

    m = FedPFT(components=3, covariance="diag")
    like = m.update_like({"head.weight": torch.zeros(3, 4), "head.bias": torch.zeros(3)}, 1)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(20, 4, generator=g)])
    y = torch.tensor([0] + [1] * 3 + [2] * 20)
    with caplog.at_level("INFO", logger="federate"):
        sent, nll = m.fit_client(x, y, like, seed=0, name="c")
    assert "client c holds one training row of 1 class(es) (0): no mixture sent for them" in caplog.text
    assert sent["gmm.count"].tolist() == [0.0, 3.0, 20.0] and not sent["gmm.means"][0].any()
    assert (sent["gmm.weights"][1] > 0).sum() == 2 and (sent["gmm.weights"][2] > 0).sum() == 3
    assert all(bool(torch.isfinite(v).all()) for v in sent.values()) and np.isfinite(nll)


# --- every method, every setting


STATS = ("fedproto", "ccvr", "fedpft")


@pytest.mark.parametrize("name", STATS)
@pytest.mark.parametrize("overrides", [
    ["partition=dirichlet", "partition.alpha=0.1", "partition.clients_per_domain=3"],
    ["partition=shards", "partition.clients_per_domain=2", "partition.classes_per_client=2", "clients_per_round=3"],
    ["target_domain=none", "partition=iid", "partition.clients_per_domain=2"],
    ["dataset.classes=[class3,class1,class0]"],
])
def test_every_statistics_method_runs_with_every_partition_and_setting(planted_cache, tmp_path, name, overrides):
    extra = ["method.head_epochs=3"] if name == "fedpft" else []
    s = run_federate(planted_cache, tmp_path, f"method={name}", *overrides, *extra, rounds=2)
    assert 0 <= s["personalization_mean"] <= 1 and np.isfinite(s["val_mean"])
    assert (s["generalization"] is None) == ("target_domain=none" in overrides)
    assert all(np.isfinite(v) for row in (tmp_path / "history.jsonl").read_text().splitlines()
               for v in json.loads(row)["train_loss"].values())


@pytest.mark.parametrize("name", STATS)
def test_a_statistics_method_resumes_to_the_same_outputs(planted_cache, tmp_path, monkeypatch, name):
    extra = ["method.head_epochs=3"] if name == "fedpft" else []
    run_federate(planted_cache, tmp_path / "whole", f"method={name}", *extra, rounds=3)
    train = CachedBackend.train
    stop = 1 if name == "fedpft" else "calibration" if name == "ccvr" else 2
    monkeypatch.setattr(CachedBackend, "train", lambda self, fed, r, s: (_ for _ in ()).throw(KeyboardInterrupt)
                        if r == stop else train(self, fed, r, s))
    with pytest.raises(Interrupted):
        run_federate(planted_cache, tmp_path / "resumed", f"method={name}", *extra, rounds=3)
    monkeypatch.setattr(CachedBackend, "train", train)
    run_federate(planted_cache, tmp_path / "resumed", f"method={name}", *extra, rounds=3)
    same_outputs(outputs(tmp_path / "whole"), outputs(tmp_path / "resumed"))


@pytest.mark.parametrize("overrides, message", [
    (["method=fedpft", "method.covariance=tied"], "method.covariance must be one of spherical, diag, full, not 'tied'"),
    (["method=fedpft", "method.components=0"], "method.components must be an integer >= 1, not 0"),
    (["method=fedpft", "method.samples_per_class=2.5"], "method.samples_per_class must be an integer >= 1"),
    (["method=fedpft", "loss=contrastive"], "method=fedpft trains its head with cross-entropy; use loss=ce"),
    (["method=fedproto", "method.weighting=counts"], "method.weighting must be rows or uniform, not 'counts'"),
    (["method=fedproto", "method.lambda=-1"], "method.lambda must be >= 0 and finite, not -1"),
    (["method=fedproto", "engine=plain"], "method=fedproto adds a term to the loss, which engine=plain"),
    (["method=ccvr", "method.virtual_per_class=0"], "method.virtual_per_class must be an integer >= 1, not 0"),
    (["method=ccvr", "method.calibration_epochs=0"], "method.calibration_epochs must be an integer >= 1, not 0"),
    (["method=ccvr", "privacy=dp_client", "privacy.noise_multiplier=1"],
     "method=ccvr sends its clients' per-class means and covariances, which privacy=dp_client does not protect"),
    (["method=fedpft", "privacy=dpsgd", "privacy.noise_multiplier=1"], "which privacy=dpsgd does not protect"),
    (["method=fedproto", "privacy=dpsgd", "privacy.noise_multiplier=1"], "which privacy=dpsgd does not protect"),
])
def test_settings_a_statistics_method_cannot_take_are_one_line_errors(planted_cache, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        run_federate(planted_cache, tmp_path, *overrides, rounds=1)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_one_batch_clients_of_ccvr_fold_their_shared_head_as_they_train_alone(planted_cache, tmp_path, monkeypatch):
    """CCVR's FedAvg of the body and the head: clients of one batch a round are folded into the sum, head
    included, and give the models the lock-step engine gives them."""
    from federate.engine import BatchedTrainer

    calls, fold = [], BatchedTrainer.fold_first_steps
    monkeypatch.setattr(BatchedTrainer, "fold_first_steps",
                        lambda self, *a, **k: calls.append(1) or fold(self, *a, **k))
    many = ("method=ccvr", "partition=iid", "partition.clients_per_domain=12")
    folded = run_federate(planted_cache, tmp_path / "auto", *many, rounds=3)
    assert len(calls) == 3
    lockstep = run_federate(planted_cache, tmp_path / "batched", *many, "engine=batched", rounds=3)
    a, b = load_file(tmp_path / "auto" / "adapter.safetensors"), load_file(tmp_path / "batched" / "adapter.safetensors")
    assert a.keys() == b.keys() and "head.weight" in a and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert folded["before_calibration"]["val_acc"] == pytest.approx(lockstep["before_calibration"]["val_acc"], abs=1e-6)


@pytest.mark.parametrize("covariance", ["spherical", "diag"])
def test_fedpfts_one_component_fits_of_every_class_at_once_equal_the_fits_one_by_one(covariance):
    from federate.methods.fedpft import FedPFT

    m = FedPFT(covariance=covariance)
    like = m.update_like({"head.weight": torch.zeros(4, 6), "head.bias": torch.zeros(4)}, 1)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 6, generator=g) * 3 + 1, torch.tensor([0] * 9 + [1] + [3] * 30)
    counts = torch.bincount(y, minlength=4).tolist()
    at_once, one_by_one = ({k: torch.zeros(v.shape, dtype=torch.float64) for k, v in like.items()} for _ in range(2))
    nll, rows = m.closed_forms(x, y, at_once)
    nll2, rows2 = m.fit_classes(x, y, counts, one_by_one, seed=0)
    for k in like:
        torch.testing.assert_close(at_once[k], one_by_one[k], rtol=1e-12, atol=1e-12)
    assert rows == rows2 == 39 and nll == pytest.approx(nll2, rel=1e-12)
