"""The federate run on planted caches: protocol, methods, outputs, error paths, CLI and sweeps."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT, run_cli, run_federate
from planted import planted, write_cache
from safetensors import safe_open

from federate.cache import load_cache
from federate.errors import ConfigError

SUMMARY_KEYS = {"method", "dataset", "target_domain", "seed", "lr", "rounds", "best_round", "generalization",
                "personalization", "personalization_mean", "overall", "trainable_params", "bytes_per_round",
                "wall_seconds"}


@pytest.fixture
def cache_file(planted_cache):
    return planted_cache


def federate(cache_file, out, *overrides):
    return run_federate(cache_file, out, *overrides)


def history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_fedclip_beats_zeroshot_on_the_held_out_domain(cache_file, tmp_path):
    zero = federate(cache_file, tmp_path / "z", "method=zeroshot")
    fed = federate(cache_file, tmp_path / "f")
    assert zero["generalization"] < 0.6 and fed["generalization"] > zero["generalization"] + 0.3
    assert fed["personalization_mean"] > 0.9


@pytest.mark.slow
def test_summary_history_splits_and_adapter_follow_the_contract(cache_file, tmp_path):
    s = federate(cache_file, tmp_path)
    assert SUMMARY_KEYS <= set(s) and json.loads((tmp_path / "summary.json").read_text())["overall"] == s["overall"]
    assert s["method"] == "fedclip" and s["dataset"] == "planted" and s["target_domain"] == "target"
    assert set(s["personalization"]) == {"alpha", "beta", "gamma"}
    assert s["overall"] == pytest.approx((s["generalization"] + sum(s["personalization"].values())) / 4)
    assert s["personalization_mean"] == pytest.approx(sum(s["personalization"].values()) / 3)
    assert s["trainable_params"] == 2 * 64 * 64 + 2 * 64
    assert s["bytes_per_round"] == {"up": 3 * 4 * s["trainable_params"], "down": 3 * 4 * s["trainable_params"]}
    assert s["fedavg_full_clip"]["trainable_params"] == 151_277_313
    assert s["split_sizes"]["alpha"] == {"train": 156, "val": 52, "test": 52} and s["target_size"] == 240
    rows = history(tmp_path)
    assert len(rows) == 15 and set(rows[0]["train_loss"]) == {"alpha", "beta", "gamma"}
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert len(splits["alpha"]["train"]) == 156 and "target" not in splits
    assert not set(splits["alpha"]["train"]) & set(splits["alpha"]["test"])
    with safe_open(tmp_path / "adapter.safetensors", "pt") as f:
        assert set(f.keys()) == {"image.0.weight", "image.0.bias", "image.2.weight", "image.2.bias"}
        meta = f.metadata()
        assert meta["target_domain"] == "target" and meta["round"] == str(s["best_round"])
        assert meta["model"] == "fedclip/planted" and json.loads(meta["config"])["lr"] == 1e-3


def test_model_selection_reports_the_round_with_the_best_mean_validation_accuracy(cache_file, tmp_path):
    s = federate(cache_file, tmp_path, "lr=3e-4", "rounds=12")
    rows = history(tmp_path)
    means = [r["val_mean"] for r in rows]
    best = int(np.argmax(means))  # the first round reaching the maximum
    assert s["best_round"] == rows[best]["round"] and s["val_mean"] == means[best]
    assert s["generalization"] == rows[best]["target_acc"] and s["personalization"] == rows[best]["test_acc"]
    improved = [r["round"] for r in rows if r.get("improved")]
    assert improved == [r["round"] for i, r in enumerate(rows) if means[i] > max(means[:i], default=-1)]


def test_fedprox_with_mu_zero_is_fedclip(cache_file, tmp_path):
    a = federate(cache_file, tmp_path / "a", "rounds=4")
    b = federate(cache_file, tmp_path / "b", "rounds=4", "method=fedprox", "method.mu=0")
    for key in ("generalization", "personalization", "best_round", "val_mean"):
        assert a[key] == b[key]
    assert [r["train_loss"] for r in history(tmp_path / "a")] == [r["train_loss"] for r in history(tmp_path / "b")]


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_every_engine_gives_the_same_run_as_the_plain_loop(cache_file, tmp_path, engine):
    a = federate(cache_file, tmp_path / "a", "rounds=3", f"engine={engine}")
    b = federate(cache_file, tmp_path / "b", "rounds=3", "engine=plain")
    assert a["val_mean"] == pytest.approx(b["val_mean"], abs=1e-9) and a["best_round"] == b["best_round"]
    for ra, rb in zip(history(tmp_path / "a"), history(tmp_path / "b")):
        for k in ra["train_loss"]:
            assert ra["train_loss"][k] == pytest.approx(rb["train_loss"][k], rel=1e-4)


@pytest.mark.parametrize("overrides", [["method=local"], ["method=central"], ["aggregation=samples"],
                                       ["loss=ce"], ["text_adapter=true"], ["method=fedprox"]])
def test_every_method_and_option_runs_and_learns(cache_file, tmp_path, overrides):
    s = federate(cache_file, tmp_path, *overrides)
    assert s["personalization_mean"] > 0.8, s
    if "method=local" in overrides:
        assert s["bytes_per_round"] == {"up": 0, "down": 0}
        with safe_open(tmp_path / "adapter.safetensors", "pt") as f:
            assert "alpha/image.0.weight" in f.keys()
    if "text_adapter=true" in overrides:
        assert s["trainable_params"] == 2 * (2 * 64 * 64 + 2 * 64)


def test_finetune_reports_personalization_before_and_after(cache_file, tmp_path):
    s = federate(cache_file, tmp_path, "rounds=3", "lr=3e-4", "finetune_epochs=3")
    assert set(s["personalization_finetuned"]) == set(s["personalization"])
    assert s["personalization_finetuned_mean"] >= s["personalization_mean"] - 0.05


def test_split_file_reuses_a_published_split(cache_file, tmp_path):
    a = federate(cache_file, tmp_path / "a", "rounds=2", "seed=4")
    b = federate(cache_file, tmp_path / "b", "rounds=2", "seed=4", f"split_file={tmp_path / 'a' / 'splits.json'}")
    assert (tmp_path / "a" / "splits.json").read_text() == (tmp_path / "b" / "splits.json").read_text()
    assert a["personalization"] == b["personalization"]


def test_the_loaded_cache_is_shared_between_runs_of_one_process(cache_file):
    assert load_cache(cache_file) is load_cache(cache_file)


def broken_caches(tmp_path):
    domains, text = planted({"a": 40, "b": 40})
    nan = {k: (x.copy(), y) for k, (x, y) in domains.items()}
    nan["b"][0][3, 3] = np.nan
    return {
        "incomplete": (write_cache(tmp_path / "i.h5", domains, text, complete=False), "is not complete"),
        "schema": (write_cache(tmp_path / "s.h5", domains, text, schema_version=2), "schema version 2"),
        "model": (write_cache(tmp_path / "m.h5", domains, text, model_name="openai/other"), "was built with model"),
        "nan": (write_cache(tmp_path / "n.h5", nan, text), "domain b of"),
    }


@pytest.mark.parametrize("case", ["incomplete", "schema", "model", "nan"])
def test_bad_caches_are_refused_with_a_clear_message(tmp_path, case):
    path, message = broken_caches(tmp_path)[case]
    with pytest.raises(ConfigError, match=message):
        federate(path, tmp_path / "out", "target_domain=a")


@pytest.mark.parametrize("overrides, message", [
    (["lr=0"], "lr must be > 0"), (["rounds=0"], "rounds must be >= 1"), (["batch_size=1"], "batch_size must be >= 2"),
    (["target_domain=nope"], "target_domain 'nope' is not in .*its domains: alpha, beta, gamma, target"),
    (["aggregation=median"], "aggregation must be"), (["method.mu=-1", "method=fedprox"], "method.mu must be >= 0"),
])
def test_nonsensical_settings_are_refused(cache_file, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        federate(cache_file, tmp_path, *overrides)


@pytest.mark.slow
def test_cli_missing_cache_says_how_to_build_it(tmp_path):
    proc = run_cli("federate", "dataset=pacs", f"cache_dir={tmp_path}", f"hydra.run.dir={tmp_path}/o", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout
    assert "no embedding cache at" in proc.stdout and f"python -m extract dataset=pacs cache_dir={tmp_path}" in proc.stdout


@pytest.mark.slow
def test_cli_sweep_runs_one_job_per_point(cache_file, tmp_path):
    proc = run_cli("federate", "-m", "lr=1e-3,1e-4", "seed=0,1", f"cache_file={cache_file}", "model.name=fedclip/planted",
                   "target_domain=target", "rounds=3", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/summary.json"))]
    assert sorted((s["lr"], s["seed"]) for s in summaries) == [(1e-4, 0), (1e-4, 1), (1e-3, 0), (1e-3, 1)]


def test_cache_of_an_interrupted_extraction_is_named_in_the_error(tmp_path):
    domains, text = planted({"a": 40, "b": 40})
    write_cache(tmp_path / "c.h5.partial", domains, text, complete=False)
    with pytest.raises(ConfigError, match="interrupted extraction left"):
        federate(tmp_path / "c.h5", tmp_path / "out")


@pytest.mark.slow
def test_cli_sweep_in_parallel_with_the_joblib_launcher(cache_file, tmp_path):
    proc = run_cli("federate", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1",
                   f"cache_file={cache_file}", "model.name=fedclip/planted", "target_domain=target", "rounds=2",
                   f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout
    assert sorted(json.loads(p.read_text())["seed"] for p in (tmp_path / "sweep").glob("*/summary.json")) == [0, 1]


def test_office_home_real_world_is_one_domain_whatever_its_spelling(tmp_path):
    domains, text = planted({"Art": 60, "Real_World": 60, "Clipart": 60})
    cache = write_cache(tmp_path / "oh.h5", domains, text)
    assert federate(cache, tmp_path / "r", "target_domain=Real World", "rounds=1")["target_domain"] == "Real_World"
    a = federate(cache, tmp_path / "a", "target_domain=Art", "rounds=2")
    split = json.loads((tmp_path / "a" / "splits.json").read_text())
    (tmp_path / "spaced.json").write_text(json.dumps({d.replace("_", " "): parts for d, parts in split.items()}))
    b = federate(cache, tmp_path / "b", "target_domain=Art", "rounds=2", f"split_file={tmp_path / 'spaced.json'}")
    assert b["personalization"] == a["personalization"] and set(b["personalization"]) == {"Real_World", "Clipart"}


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (("federate", "backbone=vgg"), "backbone=vgg is not an option of backbone; choose one of alexnet, clip"),
    (("federate", "-m", "adapter=attai,mlp"), "adapter=mlp is not an option of adapter; choose one of attai, "),
    (("extract", "dataset=nope"), "dataset=nope is not an option of dataset; choose one of cifar10, cifar100, demo, domainnet, folder, "),
    (("extract", "overwrite=no"), "overwrite must be true or false, not 'no'"),  # OmegaConf would read false
    (("federate", "-m", "text_adapter=false,yes"), "text_adapter must be true or false, not 'yes'"),
])
def test_cli_unknown_group_option_or_non_boolean_switch_is_one_line(tmp_path, args, message):
    proc = run_cli(*args, f"hydra.run.dir={tmp_path}/o", cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stdout and len(proc.stdout.strip().splitlines()) == 1, proc.stdout


def test_a_second_run_never_writes_into_a_folder_holding_another_run(cache_file, tmp_path):
    first = federate(cache_file, tmp_path, "rounds=2")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a run"):
        federate(cache_file, tmp_path, "rounds=3", "seed=5")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert json.loads((tmp_path / "summary.json").read_text())["overall"] == first["overall"]


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_default_folders(cache_file, tmp_path):
    """The default run folder is stamped to the microsecond: a shell loop's runs never share one."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "federate", f"cache_file={cache_file}", "model.name=fedclip/planted",
            "target_domain=target", "rounds=2"]
    procs = [subprocess.Popen([*args, f"seed={seed}"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for seed in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    seeds = sorted(json.loads(p.read_text())["seed"] for p in (tmp_path / "outputs" / "federate").glob("*/summary.json"))
    assert seeds == [0, 1]


@pytest.mark.parametrize("lr", ["1e30", "inf"])
def test_a_diverging_run_stops_with_one_line_naming_the_round_and_no_summary(cache_file, tmp_path, lr):
    message = "round 1: training diverged" if lr == "1e30" else "lr must be > 0 and finite"
    with pytest.raises(ConfigError, match=message):
        federate(cache_file, tmp_path, f"lr={lr}", "rounds=3")
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "adapter.safetensors").exists()


@pytest.mark.slow
def test_cli_diverging_run_is_one_line_and_exit_2(cache_file, tmp_path):
    proc = run_cli("federate", f"cache_file={cache_file}", "model.name=fedclip/planted", "target_domain=target",
                   "lr=1e30", "rounds=3", f"hydra.run.dir={tmp_path}/o", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout
    assert "round 1: training diverged" in proc.stdout.strip().splitlines()[-1]
