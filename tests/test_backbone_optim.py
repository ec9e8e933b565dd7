"""The backbone methods' local optimiser (`optimizer=adam_l2|adamw|sgd`, federate/backbone/optim.py)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import PACS_MINI, config
from torch import nn

from federate.backbone.optim import BackboneSettings, backbone_settings, fresh_optimizer
from federate.backbone.train import local_update
from federate.engine import TrainSettings
from federate.errors import ConfigError
from federate.run import run

needs_pacs = pytest.mark.skipif(not PACS_MINI.is_dir(), reason=f"{PACS_MINI} is absent")


class Tiny(nn.Module):
    """A weight matrix, a LayerNorm (gain and bias) and a CLIP-like scalar logit scale."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 3, bias=False)
        self.norm = nn.LayerNorm(3)
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        with torch.no_grad():
            self.norm.bias.fill_(0.5)  # non-zero, so that a decay would move it

    def loss(self, x, y):
        return nn.functional.cross_entropy(self.logit_scale.exp() * self.norm(self.proj(x)), y)


def batches(steps=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])) for _ in range(steps)]


def settings(name, **extra):
    node = config("federate", [f"optimizer={name}", "lr=1e-2", *(f"optimizer.{k}={v}" for k, v in extra.items())])
    return backbone_settings(node, TrainSettings(lr=1e-2))


def zero_gradient_step(name):
    """One step with a zero loss gradient: what moves is the weight decay alone."""
    model = Tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.loss = lambda x, y: sum(0 * p.sum() for p in model.parameters())  # d loss / d w = 0 for every w
    local_update(model, batches(1), settings(name), torch.device("cpu"))
    return start, model.state_dict()


def test_adam_l2_decays_every_parameter_as_fedclips_code():
    start, end = zero_gradient_step("adam_l2")
    assert all(not torch.equal(start[k], end[k]) for k in start)  # gains, biases and logit_scale too


def test_adamw_decays_only_weight_matrices():
    start, end = zero_gradient_step("adamw")
    torch.testing.assert_close(end["proj.weight"], start["proj.weight"] * (1 - 1e-2 * 0.1))  # decoupled decay 0.1
    for k in ("norm.weight", "norm.bias", "logit_scale"):
        assert torch.equal(end[k], start[k]), k


def test_sgd_is_plain_sgd():
    model, reference = Tiny(), Tiny()
    s = settings("sgd")
    assert (s.optimizer, s.lr, s.weight_decay, s.momentum) == ("sgd", 1e-2, 0.0, 0.0)
    local_update(model, batches(2), s, torch.device("cpu"))
    for x, y in batches(2):  # w <- w - lr * grad
        reference.zero_grad()
        reference.loss(x, y).backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= 1e-2 * p.grad
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name, extra", [("adamw", {}), ("sgd", {"momentum": 0.9})])
def test_a_reused_optimizer_is_a_fresh_one(name, extra):
    s = settings(name, **extra)
    model = Tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    local_update(model, batches(3), s, torch.device("cpu"))  # leaves an optimiser with state behind
    model.load_state_dict(start)
    local_update(model, batches(2), s, torch.device("cpu"))
    fresh = Tiny()
    local_update(fresh, batches(2), s, torch.device("cpu"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fresh.state_dict().items())
    assert fresh_optimizer(model, list(model.named_parameters()), settings("adam_l2")).kind == "adam_l2"  # switches


def test_summary_describes_the_optimizer():
    assert settings("adamw").describe() == {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.98],
                                            "eps": 1e-6}
    assert BackboneSettings(lr=1e-3).describe()["name"] == "adam_l2"


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.name=rmsprop"], "optimizer must be one of adam_l2, adamw, sgd, not 'rmsprop'"),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay must be >= 0, not -1.0"),
    (["optimizer=sgd", "optimizer.momentum=1"], "optimizer.momentum must be in [0, 1), not 1.0"),
    (["optimizer=sgd", "+optimizer.eps=1e-8"], "optimizer=sgd has no setting eps; it takes weight_decay, momentum"),
    (["optimizer.betas=[0.9]"], "optimizer.betas must be two numbers in [0, 1)"),
    (["optimizer.eps=abc"], "optimizer.eps must be a number"),
])
def test_bad_optimizer_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        backbone_settings(config("federate", overrides), TrainSettings(lr=1e-2))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides", [["optimizer=adamw"], ["backbone=alexnet"]])
def test_cached_methods_refuse_another_optimizer(planted_cache, tmp_path, overrides):
    cfg = config("federate", [f"cache_file={planted_cache}", "model.name=fedclip/planted", "rounds=1", *overrides])
    with pytest.raises(ConfigError) as e:
        run(cfg, tmp_path)
    assert "is for the methods that train the backbone" in str(e.value) and "\n" not in str(e.value)


def test_backbone_alexnet_defaults_to_the_toolkits_sgd_and_the_command_line_wins():
    cfg = config("federate", ["method=fedavg_full", "backbone=alexnet"])
    assert cfg.optimizer.name == "sgd" and cfg.lr == 1e-2
    cfg = config("federate", ["method=fedavg_full", "backbone=alexnet", "optimizer=adamw", "lr=1e-4"])
    assert cfg.optimizer.name == "adamw" and cfg.lr == 1e-4
    cfg = config("federate", ["method=fedavg_full"])
    assert cfg.optimizer.name == "adam_l2" and cfg.lr == 5e-5


@pytest.mark.slow
@needs_pacs
def test_fedavg_full_trains_with_adamw_and_records_it(tiny_model, tmp_path):
    cfg = config("federate", [f"dataset.root={PACS_MINI}", f"model.name={tiny_model}", "rounds=1", "lr=1e-4",
                              "backbone.num_workers=0", "method=fedavg_full", "optimizer=adamw"])
    s = run(cfg, tmp_path)
    assert s["optimizer"] == {"name": "adamw", "lr": 1e-4, "weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1e-6}
    assert json.loads((tmp_path / "summary.json").read_text())["optimizer"]["name"] == "adamw"


@pytest.mark.slow
def test_cli_unknown_optimizer_is_one_line_and_exit_2(tmp_path):
    from conftest import run_cli

    proc = run_cli("federate", "method=fedavg_full", "optimizer=rmsprop", f"hydra.run.dir={tmp_path}/o", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    assert "optimizer=rmsprop is not an option of optimizer; choose one of adam_l2, adamw, sgd" in proc.stdout
