"""Methods that train the backbone on the images (federate/backbone/): fedavg_full, fedprox_full and
fedclip_full with a tiny random CLIP, and fedavg_full with AlexNet, on the real pacs-mini slice."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import PACS_MINI, config, run_cli
from safetensors import safe_open

from federate import strategy
from federate.backbone.alexnet import AlexNet, AlexNetClassifier, AlexNetProcessor
from federate.backbone.train import RunningMean, local_update
from federate.engine import TrainSettings
from federate.errors import ConfigError
from federate.run import run

needs_pacs = pytest.mark.skipif(not PACS_MINI.is_dir(), reason=f"{PACS_MINI} is absent")
SUMMARY_KEYS = {"method", "dataset", "model", "target_domain", "seed", "lr", "rounds", "best_round",
                "generalization", "personalization", "personalization_mean", "overall", "val_mean",
                "trainable_params", "bytes_per_round", "bytes_total", "fedavg_full_clip", "split_sizes",
                "target_size", "wall_seconds", "config", "backbone", "seconds_per_round"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is faster and steadier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images_cfg(tiny_model, *overrides):
    return config("federate", [f"dataset.root={PACS_MINI}", f"model.name={tiny_model}", "rounds=2", "lr=1e-4",
                               "backbone.num_workers=0", *overrides])


def weights(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def tiny_classifier(tiny_model, tmp_path_factory):
    """A function making the tiny CLIP with trainable encoders, as backbone=clip builds it."""
    from omegaconf import OmegaConf

    from federate.backbone.build import clip_classifier, clip_parts

    def make():
        clip, _, tokenizer = clip_parts(OmegaConf.create({"name": str(tiny_model)}), str(tmp_path_factory.mktemp("c")))
        return clip_classifier(clip, tokenizer, ["a picture of a {}"], ["dog", "cat", "cow"], "contrastive", False)
    return make


def pixel_batches(seed: int, steps: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])) for _ in range(steps)]


@pytest.fixture(scope="module")
def fedavg_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fedavg_full")
    # one DataLoader worker here: the persistent-worker path (the rest of the tests decode in process)
    return run(images_cfg(tiny_model, "method=fedavg_full", "backbone.num_workers=1"), out), out


@pytest.mark.slow
@needs_pacs
def test_fedavg_full_clip_runs_end_to_end_with_the_cached_methods_outputs(fedavg_run):
    s, out = fedavg_run
    assert SUMMARY_KEYS <= set(s) and s["method"] == "fedavg_full" and s["backbone"] == "clip"
    assert s["dataset"] == "pacs" and s["target_domain"] == "art_painting"
    assert set(s["personalization"]) == {"cartoon", "photo", "sketch"}
    assert s["split_sizes"]["cartoon"] == {"train": 42, "val": 14, "test": 14} and s["target_size"] == 70
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and set(rows[0]["train_loss"]) == {"cartoon", "photo", "sketch"}
    assert rows[0]["improved"] and s["seconds_per_round"] > 0
    state, meta = weights(out / "model.safetensors")
    assert meta["method"] == "fedavg_full" and meta["backbone"] == "clip" and meta["round"] == str(s["best_round"])
    assert any(k.startswith("clip.text_model.") for k in state) and any(k.startswith("clip.vision_model.") for k in state)
    assert "clip.logit_scale" in state and all(v.dtype == torch.float32 for v in state.values())
    sent = sum(v.numel() * 4 for v in state.values())  # the whole state dict, float32, per client
    assert s["bytes_per_round"] == {"up": 3 * sent, "down": 3 * sent}
    assert s["trainable_params"] == sum(v.numel() for v in state.values())  # every entry is a parameter
    assert s["fedavg_full_clip"]["param_ratio"] == 1.0
    assert s["optimizer"] == {"name": "adam_l2", "lr": 1e-4, "weight_decay": 0.2, "betas": [0.9, 0.98], "eps": 1e-6}


@pytest.mark.slow
@needs_pacs
def test_fedprox_full_with_mu_zero_is_fedavg_full(tiny_model, fedavg_run, tmp_path):
    s0, out0 = fedavg_run
    s = run(images_cfg(tiny_model, "method=fedprox_full", "method.mu=0"), tmp_path)
    a, b = weights(out0 / "model.safetensors")[0], weights(tmp_path / "model.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("best_round", "generalization", "personalization", "val_mean"):
        assert s[key] == s0[key]
    h0, h = ((p / "history.jsonl").read_text().splitlines() for p in (out0, tmp_path))
    assert [json.loads(r)["train_loss"] for r in h] == [json.loads(r)["train_loss"] for r in h0]


def test_fedprox_full_proximal_term_pulls_towards_the_global_model(tiny_classifier):
    model = tiny_classifier()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    drift = {}
    for mu in (0.0, 100.0):
        model.load_state_dict(start)
        local_update(model, pixel_batches(0, 3), TrainSettings(lr=1e-3, mu=mu), torch.device("cpu"), anchor=start)
        drift[mu] = sum((v - start[k]).norm() ** 2 for k, v in model.state_dict().items())
    assert drift[100.0] < drift[0.0]


@pytest.mark.slow
@needs_pacs
def test_fedclip_full_trains_the_adapter_with_the_backbone(tiny_model, tmp_path):
    s = run(images_cfg(tiny_model, "method=fedclip_full"), tmp_path)
    state, _ = weights(tmp_path / "model.safetensors")
    assert {"adapter.image.0.weight", "adapter.image.0.bias", "adapter.image.2.weight", "adapter.image.2.bias"} <= set(state)
    adapter = 2 * 32 * 32 + 2 * 32  # AttAI at the tiny model's embedding size 32
    clip = sum(v.numel() for k, v in state.items() if k.startswith("clip."))
    assert s["trainable_params"] == clip + adapter and s["adapter"]["name"] == "attai"
    assert s["method"] == "fedclip_full" and s["backbone"] == "clip" and len(s["personalization"]) == 3


ALEXNET_PACS_PARAMS = 57_051_207  # the toolkit's AlexNet with BatchNorm and a 7-way head (trainable)
ALEXNET_BN_STATS = 2 * (64 + 192 + 384 + 256 + 256 + 4096 + 4096)  # running_mean and running_var


@pytest.mark.slow
@needs_pacs
def test_fedavg_full_alexnet_runs_end_to_end_as_the_authors_toolkit(tmp_path):
    cfg = config("federate", [f"dataset.root={PACS_MINI}", "dataset.domains=[art_painting,cartoon,photo]",
                              "method=fedavg_full", "backbone=alexnet", "backbone.image_size=64",
                              "backbone.num_workers=0", "rounds=2"])
    s = run(cfg, tmp_path)
    assert s["backbone"] == "alexnet" and s["trainable_params"] == ALEXNET_PACS_PARAMS and s["image_size"] == 64
    assert s["optimizer"] == {"name": "sgd", "lr": 1e-2, "weight_decay": 0.0, "momentum": 0.0}  # the toolkit's
    assert set(s["personalization"]) == {"cartoon", "photo"}
    state, meta = weights(tmp_path / "model.safetensors")
    assert meta["backbone"] == "alexnet" and state["classifier.fc3.weight"].shape == (7, 4096)
    # the BatchNorm statistics are averaged and kept with the weights (trained away from their init)
    assert not torch.equal(state["features.bn1.running_mean"], torch.zeros(64))
    assert not torch.equal(state["classifier.bn7.running_var"], torch.ones(4096))
    counts = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert len(counts) == 7 and all(float(c) == round(float(c)) > 0 for c in counts)  # a whole number of batches
    sent = 4 * (ALEXNET_PACS_PARAMS + ALEXNET_BN_STATS + 7)
    assert s["bytes_per_round"]["up"] == 2 * sent


def test_alexnet_is_the_authors_toolkit_architecture():
    model = AlexNetClassifier(65)
    names = [n for n, _ in model.named_modules()]
    bns = [f"features.bn{i}" for i in range(1, 6)] + ["classifier.bn6", "classifier.bn7"]
    assert [n for n in names if ".bn" in n] == bns
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())  # the toolkit's has none
    assert sum(p.numel() for p in AlexNet(7).parameters()) == ALEXNET_PACS_PARAMS
    assert model(torch.zeros(2, 3, 256, 256)).shape == (2, 65)


def test_alexnet_inputs_are_the_toolkits_transforms():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (227, 300, 3), dtype=np.uint8))
    processor = AlexNetProcessor(256)
    x = processor(images=image)["pixel_values"]
    # evaluation: resized to 256 x 256 (aspect ratio not kept, no crop), [0, 1], no mean/std
    expected = np.asarray(image.resize((256, 256), Image.BILINEAR), dtype=np.float32) / 255
    assert x.shape == (1, 3, 256, 256) and torch.equal(x[0], torch.from_numpy(expected).permute(2, 0, 1))
    # training: a seeded horizontal flip and rotation in [-30, 30] degrees with black corners
    a, b, c = (processor.augmented(s)(images=image)["pixel_values"] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    g = torch.Generator().manual_seed(1)
    flip = torch.rand(1, generator=g).item() < 0.5
    angle = torch.empty(1).uniform_(-30, 30, generator=g).item()
    manual = image.resize((256, 256), Image.BILINEAR)
    manual = (manual.transpose(Image.FLIP_LEFT_RIGHT) if flip else manual).rotate(angle, Image.NEAREST)
    assert torch.equal(a[0], torch.from_numpy(np.asarray(manual, dtype=np.float32) / 255).permute(2, 0, 1))


def test_training_keys_carry_a_seeded_augmentation_that_images_apply():
    from federate.backbone.data import Images
    from federate.backbone.train import client_batches

    batches = client_batches([5, 6, 7, 8], 1, "cartoon", 0, 3, 2, 1)
    assert batches == client_batches([5, 6, 7, 8], 1, "cartoon", 0, 3, 2, 1)  # reproducible
    keys = [k for b in batches for k in b]
    assert sorted(k[1] for k in keys) == [5, 6, 7, 8] and len({k[2] for k in keys}) == 4
    assert keys != [k for b in client_batches([5, 6, 7, 8], 1, "cartoon", 0, 4, 2, 1) for k in b]  # per round

    class Domain:  # one image, opened as extract's DomainImages does
        name, ids, labels = "d", ["x"], [0]

        def __len__(self):
            return 1

        def open(self, i):
            from PIL import Image

            return Image.new("RGB", (80, 60), (250, 250, 250))

    images = Images([Domain()], AlexNetProcessor(64))
    (key, plain, _), (key2, augmented, _) = images[(0, 0)], images[(0, 0, 7)]
    assert key == key2 == (0, 0) and plain.min() > 0.9  # a white image
    assert augmented.min() == 0 and torch.equal(augmented, AlexNetProcessor(64).augmented(7)(
        images=Domain().open(0))["pixel_values"][0])  # rotated: black corners


def test_server_averages_batchnorm_statistics_and_rounds_the_batch_count():
    start = {"bn.running_mean": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(0.0)}
    total = RunningMean(start)
    for mean, count, w in ((1.0, 4, 1 / 3), (2.0, 3, 1 / 3), (6.0, 3, 1 / 3)):
        total.add({"bn.running_mean": torch.full((3,), mean), "bn.num_batches_tracked": torch.tensor(float(count))}, w)
    result = total.result()
    torch.testing.assert_close(result["bn.running_mean"], torch.full((3,), 3.0))
    assert result["bn.num_batches_tracked"].item() == 3.0  # 10/3, rounded: a count


def test_server_averages_every_parameter_as_strategy_fedavg(tiny_classifier):
    model = tiny_classifier()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    one = {k: torch.full_like(v, 1.0) for k, v in start.items()}
    three = {k: torch.full_like(v, 3.0) for k, v in start.items()}
    for how, expected in (("uniform", 2.0), ("samples", 2.5)):  # two clients with 10 and 30 training images
        total = RunningMean(start)
        for state, w in zip((one, three), strategy.client_weights([10, 30], how).tolist()):
            total.add(state, w)
        mean = total.result()
        assert mean.keys() == start.keys() and len(mean) == len(dict(model.named_parameters()))
        assert all(torch.all(v == expected) for v in mean.values())  # every parameter, both encoders
    # on two clients' real local updates the running mean equals strategy.FedAvg's mean of the stacked states
    clients = []
    for seed in (1, 2):
        model.load_state_dict(start)
        local_update(model, pixel_batches(seed), TrainSettings(lr=1e-3), torch.device("cpu"))
        clients.append({k: v.clone() for k, v in model.state_dict().items()})
    n = [42, 30]
    total = RunningMean(start)
    for state, w in zip(clients, strategy.client_weights(n, "samples").tolist()):
        total.add(state, w)
    stacked = {k: torch.stack([c[k] for c in clients]) for k in start}
    reference = strategy.FedAvg("samples").aggregate_train(start, stacked, n)
    changed = 0
    for k in start:
        torch.testing.assert_close(total.result()[k], reference[k], rtol=1e-6, atol=1e-7)
        changed += not torch.equal(reference[k], start[k])
    assert changed == len(start)  # every parameter moved and was averaged


def test_a_reused_adam_with_zeroed_state_is_a_fresh_adam(tiny_classifier):
    model = tiny_classifier()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(lr=1e-3)
    local_update(model, pixel_batches(3), settings, torch.device("cpu"))  # leaves an Adam with state behind
    model.load_state_dict(start)
    local_update(model, pixel_batches(4), settings, torch.device("cpu"))  # reuses it, zeroed
    fresh = tiny_classifier()
    fresh.load_state_dict(start)
    local_update(fresh, pixel_batches(4), settings, torch.device("cpu"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fresh.state_dict().items())


@pytest.mark.slow
@needs_pacs
def test_split_ids_equal_a_cached_run_of_the_same_seed_and_split_file_works(tiny_model, fedavg_run, tmp_path):
    from extract.pipeline import run as extract

    cache = tmp_path / "pacs.h5"
    extract(config("extract", [f"dataset.root={PACS_MINI}", f"model.name={tiny_model}", f"cache_file={cache}",
                               "num_workers=0", f"cache_dir={tmp_path}"]))
    cached = run(config("federate", [f"cache_file={cache}", f"model.name={tiny_model}", "rounds=1"]), tmp_path / "c")
    assert cached["method"] == "fedclip"
    _, out = fedavg_run
    assert (tmp_path / "c" / "splits.json").read_text() == (out / "splits.json").read_text()
    # split_file=: a published split (here: seed 5's) is used as given
    other = run(config("federate", [f"cache_file={cache}", f"model.name={tiny_model}", "rounds=1", "seed=5",
                                    "method=zeroshot"]), tmp_path / "z")
    assert other["method"] == "zeroshot"
    split_file = tmp_path / "z" / "splits.json"
    run(images_cfg(tiny_model, "method=fedavg_full", "rounds=1", f"split_file={split_file}"), tmp_path / "f")
    assert json.loads((tmp_path / "f" / "splits.json").read_text()) == json.loads(split_file.read_text())
    assert split_file.read_text() != (out / "splits.json").read_text()


@pytest.mark.slow
@needs_pacs
def test_report_lists_the_backbone_runs_beside_the_cached_ones(fedavg_run, tmp_path):
    from federate.report import method_label

    s, _ = fedavg_run
    assert method_label(s).startswith("fedavg_full/clip")
    prox = {**s, "method": "fedprox_full", "mu": 0.01, "config": {**s["config"], "method": {"name": "fedprox_full",
                                                                                            "mu": 0.01}}}
    assert method_label(prox).startswith("fedprox_full/clip (mu=0.01")


@pytest.mark.slow
@needs_pacs
def test_the_report_puts_the_baselines_beside_fedclip_on_a_cache_of_the_same_images(fedavg_run, tiny_model, tmp_path):
    """A backbone run names the images it trained on (their inputs fingerprint) and the model; the report
    groups it with the runs on the cache extracted from the same images with the same model."""
    import shutil

    from conftest import run_cli

    from federate.report import report

    s, out = fedavg_run
    assert s["cache_identity_sha256"] is None and len(s["inputs_fingerprint"]) == 64 and s["model_fingerprint"]
    proc = run_cli("extract", f"dataset.root={PACS_MINI}", "dataset.name=pacs", f"model.name={tiny_model}",
                   f"cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/x", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    cache = next((tmp_path / "cache").rglob("*.h5"))
    runs = tmp_path / "runs"
    shutil.copytree(out, runs / "fedavg_full")
    cached = run(config("federate", [f"cache_file={cache}", f"model.name={tiny_model}", "rounds=2"]), runs / "fedclip")
    assert cached["cache_inputs_fingerprint"] == s["inputs_fingerprint"]
    assert cached["cache_model_fingerprint"] == s["model_fingerprint"]
    text = report(runs, make_plots=False)
    assert "fedavg_full/clip" in text and "fedclip" in text and "malformed" not in text
    assert len(list((runs / "report").glob("pacs__*"))) == 1  # one table set: the same images and model


@pytest.mark.parametrize("overrides, message", [
    (["backbone.name=vgg"], "backbone must be one of clip, alexnet, not 'vgg'"),
    (["method=fedclip_full", "backbone=alexnet"], "method=fedclip_full trains FedCLIP's adapter"),
    (["backbone=alexnet", "backbone.image_size=32"], "backbone.image_size must be >= 63"),
    (["method=fedclip_full", "adapter=linear_head"], "use adapter=attai"),
    (["dataset.root=/nonexistent/pacs"], "method=fedavg_full trains on the images, which are unavailable"),
    pytest.param(["model.name=/nonexistent/clip"], "/nonexistent/clip", marks=needs_pacs),  # images first
])
def test_bad_settings_are_one_line_errors(overrides, message, tmp_path):
    cfg = config("federate", [f"dataset.root={PACS_MINI}", "method=fedavg_full", *overrides])
    with pytest.raises(ConfigError, match=None) as e:
        run(cfg, tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_cli_without_images_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("federate", "method=fedavg_full", "dataset=pacs", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    errors = [line for line in proc.stdout.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stdout, proc.stdout
    assert "cannot load hub dataset 'flwrlabs/pacs'" in errors[0] and "dataset.root" in errors[0]
