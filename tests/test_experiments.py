"""Named protocols (conf/experiment/, lightning-hydra-template's `experiment` group): each composes with its
source's settings and runs a few rounds on a planted cache; `python -m federate -m experiment=<name>` sweeps
the sweep ones."""
from __future__ import annotations

import json
import math

import pytest
from conftest import ROOT, config, run_cli
from planted import planted, write_cache

from federate.cli import choices
from federate.run import run

EXPERIMENTS = ("fedclip_pacs", "promptfl", "fedapt_domainnet", "cifar100_100clients")
PLANTED = ["model.name=fedclip/planted", "rounds=2", "lr=1e-3"]


def test_every_experiment_is_here_and_names_its_source():
    assert set(choices("experiment")) == set(EXPERIMENTS)
    for name in EXPERIMENTS:
        text = (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n") and ("arXiv" in text or "github.com" in text), name
    assert config("federate", []).get("experiment") is None  # no experiment unless one is named


def sweeper_params(name: str) -> dict:
    from hydra import compose, initialize_config_dir

    import federate  # noqa: F401  (the config schema)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("federate", [f"experiment={name}"], return_hydra_config=True)
    return dict(cfg.hydra.sweeper.params or {})


def test_fedclip_pacs_is_the_papers_36_run_sweep():
    cfg = config("federate", ["experiment=fedclip_pacs"])
    assert (cfg.dataset.name, cfg.model.name, cfg.method.name, cfg.adapter.name) == \
        ("pacs", "openai/clip-vit-base-patch32", "fedclip", "attai")
    assert (cfg.rounds, cfg.local_epochs, cfg.batch_size, cfg.aggregation) == (200, 1, 32, "uniform")
    params = {k: str(v).split(",") for k, v in sweeper_params("fedclip_pacs").items()}
    assert params == {"lr": ["1e-5", "5e-5", "1e-4"], "target_domain": ["art_painting", "cartoon", "photo", "sketch"],
                      "seed": ["0", "1", "2"]}
    assert math.prod(len(v) for v in params.values()) == 36


def test_promptfl_has_its_authors_settings():
    cfg = config("federate", ["experiment=promptfl"])
    assert (cfg.method.name, cfg.adapter.name, cfg.adapter.n_ctx, cfg.adapter.csc, cfg.adapter.optimizer) == \
        ("fedclip", "coop", 16, False, "sgd")
    assert (cfg.lr, cfg.local_epochs, cfg.rounds, cfg.batch_size, cfg.loss, cfg.aggregation) == \
        (0.001, 5, 20, 32, "ce", "uniform")
    assert (cfg.adapter.momentum, cfg.adapter.sgd_weight_decay) == (0.9, 5e-4)
    assert config("federate", ["experiment=promptfl", "lr=0.002"]).lr == 0.002  # the command line wins


def test_fedapt_domainnet_and_cifar100_are_their_papers_partitions():
    cfg = config("federate", ["experiment=fedapt_domainnet"])
    assert (cfg.dataset.name, cfg.dataset.classes, cfg.target_domain, cfg.rounds, cfg.clients_per_round) == \
        ("domainnet", None, "none", 50, 6)
    assert dict(cfg.partition) == {"name": "dirichlet", "clients_per_domain": 5, "alpha": 0.5, "min_rows": 10}
    cfg = config("federate", ["experiment=cifar100_100clients"])
    assert (cfg.dataset.name, cfg.target_domain, cfg.clients_per_round) == ("cifar100", "none", 10)
    assert dict(cfg.partition) == {"name": "dirichlet", "clients_per_domain": 100, "alpha": 0.3, "min_rows": 10}


@pytest.mark.parametrize("name, overrides", [
    ("fedclip_pacs", ["target_domain=target", "seed=1"]),  # one point of the sweep
    ("fedapt_domainnet", []),
])
def test_an_experiment_runs_on_a_planted_cache(planted_cache, tmp_path, name, overrides):
    s = run(config("federate", [f"experiment={name}", f"cache_file={planted_cache}", *PLANTED, *overrides]), tmp_path)
    assert s["rounds"] == 2 and s["config"]["rounds"] == 2
    if name == "fedapt_domainnet":  # every domain takes part, 5 clients each, 6 sampled a round
        assert s["target_domain"] is None and len(s["personalization"]) == 4 * 5 and s["clients_per_round"] == 6
        rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
        assert [len(r["sampled"]) for r in rows] == [6, 6]
    else:
        assert s["target_domain"] == "target" and s["seed"] == 1


def test_cifar100_100clients_runs_on_a_planted_cache_of_one_domain(tmp_path):
    cache = write_cache(tmp_path / "one.h5", *planted({"cifar100": 6000}, classes=20))
    s = run(config("federate", ["experiment=cifar100_100clients", f"cache_file={cache}", *PLANTED]), tmp_path / "r")
    assert len(s["personalization"]) == 100 and s["clients_per_round"] == 10 and s["generalization"] is None


def test_promptfl_runs_on_a_cache_of_the_tiny_clip(tiny_model, tmp_path):
    from test_coop import coop_cache

    cache = coop_cache(tmp_path / "coop.h5", tiny_model)
    cfg = config("federate", ["experiment=promptfl", f"cache_file={cache}", f"model.name={tiny_model}",
                              "target_domain=target", "rounds=2", "adapter.n_ctx=4", "local_epochs=1"])
    s = run(cfg, tmp_path / "r")
    assert s["adapter"]["name"] == "coop" and s["adapter"]["optimizer"] == "sgd" and s["lr"] == 0.001


@pytest.mark.slow
def test_an_experiment_sweeps_from_the_command_line(planted_cache, tmp_path):
    from federate.sweep_folder import planned_jobs

    folder = tmp_path / "sweep"
    proc = run_cli("federate", "-m", "experiment=fedclip_pacs", f"cache_file={planted_cache}", *PLANTED,
                   "target_domain=target", "seed=0,1", f"hydra.sweep.dir={folder}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    # the command line's lr, target_domain and seed win over the experiment's sweep: 2 jobs, not 36
    assert sorted(p.name for p in folder.iterdir() if (p / "summary.json").exists()) == ["0", "1"]
    assert planned_jobs(folder) == 2 and "2 jobs finished" in proc.stdout
    proc = run_cli("federate", "experiment=nope", cwd=tmp_path)
    assert proc.returncode == 2 and "experiment=nope is not an option of experiment" in proc.stdout
