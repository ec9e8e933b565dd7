"""Datasets that say what they are: VLCS comes from a folder; Office-Home's "Real World" has one name."""
from __future__ import annotations

import io
import json
import random

import h5py
import pytest
from conftest import config

from extract import pipeline
from extract.errors import ExtractError
from extract.sources import load_source
from federate.cache import canonical_domain, load_cache


def test_vlcs_without_a_root_says_it_comes_from_a_local_folder(tmp_path):
    cfg = config("extract", ["dataset=vlcs", f"cache_dir={tmp_path}"])
    with pytest.raises(ExtractError) as e:
        pipeline.run(cfg)
    text = str(e.value)
    assert "\n" not in text and "dataset vlcs has no hub copy" in text
    assert text.endswith(f"run: python -m extract dataset=vlcs model.name=openai/clip-vit-base-patch32 "
                         f"cache_dir={tmp_path} dataset.root=/path/to/vlcs")  # the settings given, with the root


def shapes(root, domains, classes=("Alarm_Clock", "Bike"), per_class=2):
    from extract.demo import draw

    rng = random.Random(3)
    for d in domains:
        for c in classes:
            (root / d / c).mkdir(parents=True)
            for i in range(per_class):
                draw("circle" if c == "Bike" else "square", "photo", 16, rng).save(root / d / c / f"{i}.png")
    return root


@pytest.mark.parametrize("folder", ["Real_World", "Real World"])
def test_office_home_folder_copies_use_one_domain_name(tmp_path, tiny_model, folder):
    root = shapes(tmp_path / "OfficeHome", ["Art", folder])
    path = pipeline.run(config("extract", ["dataset=office_home", f"dataset.root={root}", f"model.name={tiny_model}",
                                           f"cache_dir={tmp_path / 'cache'}", "num_workers=0"]))
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["domains"]) == ["Art", "Real_World"]
        assert f["domains/Real_World/ids"][0].decode().startswith(folder + "/")  # ids keep the real path
    cache = load_cache(path, domains=("Real World",))  # federate: either spelling selects the domain
    assert list(cache.domains) == ["Real_World"]
    assert canonical_domain("Real World") == "Real_World" == canonical_domain(" Real  World ")


def test_picking_a_domain_by_either_spelling(tmp_path):
    root = shapes(tmp_path / "oh", ["Art", "Real World"])
    cfg = config("extract", ["dataset=office_home", f"dataset.root={root}", "dataset.domains=[Real World]"])
    assert [d.name for d in load_source(cfg.dataset).domains] == ["Real_World"]
    (root / "Real_World").mkdir()
    with pytest.raises(ExtractError, match="are the same domain 'Real_World'"):
        load_source(cfg.dataset)


def test_the_hub_copy_of_office_home_gets_the_same_domain_name(monkeypatch, tmp_path):
    import datasets
    from PIL import Image

    def png(color):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), color).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    features = datasets.Features({"image": datasets.Image(), "domain": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["Alarm_Clock", "Bike"])})
    table = datasets.Dataset.from_dict({"image": [png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255))],
                                        "domain": ["Art", "Real World", "Real World"], "label": [0, 1, 0]},
                                       features=features)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: table)
    source = load_source(config("extract", ["dataset=office_home"]).dataset)
    assert [d.name for d in source.domains] == ["Art", "Real_World"]
    real_world = source.domains[1]
    assert real_world.ids == ["train/1", "train/2"] and real_world.labels == [1, 0]
    assert real_world.open(0).convert("RGB").getpixel((0, 0)) == (0, 255, 0)
    assert source.prompt_names == ["alarm clock", "bike"]


def test_a_hub_dataset_without_a_domain_column_is_one_domain(monkeypatch):
    import datasets
    from PIL import Image

    def png(color):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), color).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["apple", "aquarium_fish"]),
                                  "coarse_label": datasets.ClassLabel(names=["fruit", "fish"])})
    table = datasets.Dataset.from_dict({"img": [png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255))],
                                        "fine_label": [1, 0, 1], "coarse_label": [1, 0, 1]}, features=features)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: table)
    source = load_source(config("extract", ["dataset=cifar100"]).dataset)
    assert [d.name for d in source.domains] == ["cifar100"] and source.class_names == ["apple", "aquarium_fish"]
    (only,) = source.domains
    assert only.ids == ["train/0", "train/1", "train/2"] and only.labels == [1, 0, 1]
    assert only.open(1).convert("RGB").getpixel((0, 0)) == (0, 255, 0)
    assert source.prompt_names == ["apple", "aquarium fish"]
    coarse = load_source(config("extract", ["dataset=cifar100", "dataset.label_column=coarse_label"]).dataset)
    assert coarse.class_names == ["fruit", "fish"]
    with pytest.raises(ExtractError, match=r"lacks columns \['image'\] .*set dataset.image_column"):
        load_source(config("extract", ["dataset=cifar100", "dataset.image_column=image"]).dataset)
    with pytest.raises(ExtractError, match=r"lacks columns \['domain'\]"):
        load_source(config("extract", ["dataset=cifar100", "dataset.domain_column=domain"]).dataset)


def test_domainnet_comes_from_a_folder(tmp_path):
    cfg = config("extract", ["dataset=domainnet", f"cache_dir={tmp_path}"])
    with pytest.raises(ExtractError, match="dataset domainnet has no hub copy: it is read from a local folder"):
        load_source(cfg.dataset)
