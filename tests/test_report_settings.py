"""Every setting of conf/federate.yaml that changes what a run measures tells its runs apart in the report
(a method variant, a row; or the results' identity: the table set, the target, the lr, the seed); the
others are declared not to matter, with the reason (federate/report.py)."""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
from conftest import ROOT
from omegaconf import DictConfig, OmegaConf

from federate import report
from federate.cli import choices
from federate.report import method_label

GROUPS = ("dataset", "model", "method", "adapter", "strategy", "backbone", "optimizer", "partition", "experiment",
          "privacy")
PACS = "pacs__openai--clip-vit-base-patch32"


def leaves(node, prefix: str = "") -> list[str]:
    """The dotted paths of a config's settings (a list is one setting)."""
    out = []
    for key in node.keys():
        child = node._get_node(key)
        path = f"{prefix}{key}"
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            out += leaves(child, path + ".")
        else:
            out.append(path)
    return out


@functools.lru_cache(maxsize=1)
def composed() -> tuple[DictConfig, ...]:
    """conf/federate.yaml with its defaults, and with each option of each config group."""
    from hydra import compose, initialize_config_dir

    import federate.adapters  # noqa: F401  (registers the adapters kept in Hydra's ConfigStore)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return (compose("federate", []),
                *(compose("federate", [f"{group}={option}"]) for group in GROUPS for option in choices(group)))


@pytest.fixture(scope="module")
def settings() -> dict[str, DictConfig]:
    """Every setting's path -> a composed config that has it."""
    out = {}
    for cfg in composed():
        for path in leaves(cfg):
            out.setdefault(path, cfg)
    return out


def test_every_setting_is_a_variant_key_part_of_the_identity_or_declared_not_to_matter(settings):
    assert "method.mu" in settings and "dataset.classes" in settings and "partition.alpha" in settings
    unknown = sorted(p for p in settings if report.reported_as(p) is None)
    assert not unknown, (f"settings the report neither tells apart nor declares not to matter: {unknown}; "
                         "add them to federate/report.py's VARIANT_KEYS (with DEFAULTS), IDENTITY or NOT_MEASURED")


def test_declared_settings_say_why_and_exist():
    for table in (report.IDENTITY, report.NOT_MEASURED):
        assert all(isinstance(why, str) and len(why) > 10 for why in table.values())
    # no stale declaration: each names a setting (or a group, ending in ".") of some composed config
    paths = {p for cfg in composed() for p in leaves(cfg)}
    for key in (*report.IDENTITY, *report.NOT_MEASURED, *report.VARIANT_KEYS):
        assert key in paths or any(p.startswith(key) for p in paths if key.endswith(".")), key


def other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 3
    if isinstance(value, str):
        return value + "_x"
    if isinstance(value, list):
        return [*value, "x"]
    return "x"


def fake_summary(cfg: DictConfig) -> dict:
    """What a run of `cfg` records that method_label reads: its config, and the groups it used."""
    c = OmegaConf.to_container(cfg, resolve=False)
    return {"method": c["method"]["name"], "config": c, "adapter": dict(c["adapter"]), "strategy": dict(c["strategy"]),
            "partition": dict(c["partition"]), "optimizer": dict(c["optimizer"]), "backbone": c["backbone"]["name"]}


def test_every_variant_setting_makes_another_row(settings):
    variants = sorted(p for p in settings if report.reported_as(p) == "variant" and not p.endswith(".name"))
    assert {"method.mu", "partition.alpha", "adapter.n_ctx", "strategy.server_lr", "optimizer.weight_decay",
            "backbone.image_size", "rounds", "loss"} <= set(variants)
    assert "lr" not in variants and "seed" not in variants and "device" not in variants
    same = []
    for path in variants:
        base = fake_summary(settings[path])
        changed = copy.deepcopy(base)
        key = path.split(".")
        nodes = [changed["config"]] + ([changed[key[0]]] if isinstance(changed.get(key[0]), dict) else [])
        for node in nodes:  # the config and the summary's record of the group, as a run writes both
            for k in key[:-1] if node is changed["config"] else key[1:-1]:
                node = node[k]
            node[key[-1]] = other_value(node[key[-1]])
        if method_label(base) == method_label(changed):
            same.append(path)
    assert not same, f"settings whose change leaves a run in the same row: {same}"


def test_a_new_method_setting_is_a_variant_key_without_an_edit_of_the_report():
    base = {"method": "fedclip", "config": {"method": {"name": "fedclip"}}}
    assert report.reported_as("method.lambda") == "variant"
    assert method_label({**base, "config": {"method": {"name": "fedclip", "lambda": 0.5}}}) == "fedclip (lambda=0.5)"
    assert method_label(base) == "fedclip"


def fake_run(root: Path, name: str, classes=None, **fields) -> Path:
    s = {"method": "fedclip", "dataset": "pacs", "model": "openai/clip-vit-base-patch32", "target_domain": "art_painting",
         "seed": 0, "lr": 1e-4, "rounds": 200, "val_mean": 0.5, "generalization": 0.5,
         "personalization": {"cartoon": 0.5}, "personalization_mean": 0.5, "overall": 0.5,
         "cache_identity_sha256": "a" * 64, "config": {"dataset": {"name": "pacs", "classes": classes}}, **fields}
    (root / name).mkdir(parents=True)
    (root / name / "summary.json").write_text(json.dumps(s))
    return root / name


def test_runs_on_other_class_subsets_are_other_tables_never_seeds_of_one_cell(tmp_path):
    for target in ("art_painting", "cartoon", "photo", "sketch"):
        fake_run(tmp_path, f"all-{target}", target_domain=target, generalization=0.9)
        fake_run(tmp_path, f"two-{target}", classes=["dog", "horse"], target_domain=target, generalization=0.2)
    fake_run(tmp_path, "three", classes=["dog", "horse", "house"], seed=0, generalization=0.4)  # same seed
    text = report.report(tmp_path, make_plots=False)
    folders = sorted(p.name for p in (tmp_path / "report").iterdir() if p.is_dir())
    assert len(folders) == 3, folders
    cells = {}
    for f in folders:
        for row in (tmp_path / "report" / f / "generalization.csv").read_text().splitlines()[1:]:
            cells.setdefault(f, []).append(row.split(",")[:3])
    whole = next(f for f in folders if "classes" not in f)
    assert [r[0] for r in cells[whole]] == ["fedclip", "FedCLIP (paper)"]  # the paper's row: every class only
    subsets = [f for f in folders if f != whole]
    assert all([r[0] for r in cells[f]] == ["fedclip"] for f in subsets)
    assert sorted(cells[f][0][1] for f in subsets) == ["20.0000", "40.0000"]
    assert "repeated" not in text and "classes dog, horse (2 classes)" in text
    assert "classes dog, horse, house (3 classes)" in text


def test_real_runs_on_a_class_subset_are_reported_apart(planted_cache, tmp_path):
    from conftest import run_federate

    run_federate(planted_cache, tmp_path / "runs" / "all", rounds=2)
    run_federate(planted_cache, tmp_path / "runs" / "sub", "dataset.classes=[class0,class1,class2]", rounds=2)
    text = report.report(tmp_path / "runs", make_plots=False)
    assert "classes class0, class1, class2 (3 classes)" in text and "repeated" not in text
    assert len([p for p in (tmp_path / "runs" / "report").iterdir() if p.is_dir()]) == 2
