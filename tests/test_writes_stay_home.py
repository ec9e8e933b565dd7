"""Nothing the tool writes leaves its folder: every writer (a run, the Flower server, the image backbones,
the report, the partition plot, extract's cache, the demo images, the tiny model) replaces a symbolic link
at its target or refuses it, never writes through it, and refuses a folder that is a link, in one line.
Each test plays a hostile user: a link to a file outside, a dangling link, a linked folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import PACS_MINI, config, run_cli, run_federate

from extract.files import UnsafePath
from federate.errors import ConfigError


@pytest.fixture
def keep(tmp_path) -> Path:
    """A file outside the tool's folders that must never change."""
    path = tmp_path / "keep.txt"
    path.write_text("keep")
    return path


def regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


# ---------------------------------------------------------------- a run (federate/run.py, federate/experiment.py)
def test_a_run_replaces_links_at_its_outputs_and_writes_nothing_outside(planted_cache, tmp_path, keep):
    out = tmp_path / "run"
    out.mkdir()
    (out / "splits.json").symlink_to(keep)
    (out / "adapter.safetensors").symlink_to(keep)
    (out / "summary.json").symlink_to(tmp_path / "dangling.json")
    run_federate(planted_cache, out, rounds=2)
    assert keep.read_text() == "keep" and not (tmp_path / "dangling.json").exists()
    assert all(regular(out / name) for name in ("splits.json", "adapter.safetensors", "summary.json", "history.jsonl"))
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


def test_a_history_link_is_refused_in_one_line(planted_cache, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "history.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(UnsafePath, match="history.jsonl is a symbolic link"):
        run_federate(planted_cache, out, rounds=2)
    assert not (tmp_path / "elsewhere.jsonl").exists()


def test_a_linked_run_folder_is_refused(planted_cache, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "run").symlink_to(real)
    with pytest.raises(UnsafePath, match="symbolic link"):
        run_federate(planted_cache, tmp_path / "run", rounds=2)
    assert list(real.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [False, True])
def test_the_cli_refuses_a_linked_output_folder_before_hydra_writes_into_it(planted_cache, tmp_path, sweep):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real)
    where = [f"hydra.sweep.dir={tmp_path / 'out'}", "seed=0,1"] if sweep else [f"hydra.run.dir={tmp_path / 'out'}"]
    proc = run_cli("federate", *(["-m"] if sweep else []), f"cache_file={planted_cache}", "model.name=fedclip/planted",
                   "target_domain=target", "rounds=1", *where, cwd=tmp_path)
    assert proc.returncode == 2 and "symbolic link" in proc.stdout and "Traceback" not in proc.stdout, proc.stdout
    assert list(real.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["federate.log", ".hydra/config.yaml", ".hydra"])
def test_hydras_own_files_are_never_written_through_a_link(planted_cache, tmp_path, keep, name):
    out = tmp_path / "run"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).symlink_to(keep if name != ".hydra" else tmp_path)
    proc = run_cli("federate", f"cache_file={planted_cache}", "model.name=fedclip/planted", "target_domain=target",
                   "rounds=1", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 2 and f"{out / name} is a symbolic link" in proc.stdout, proc.stdout
    assert keep.read_text() == "keep" and not (tmp_path / "config.yaml").exists()


def test_hydra_paths_cover_a_run_and_each_job_of_a_sweep(tmp_path):
    from federate.callbacks import hydra_paths

    (tmp_path / "sweep" / "0").mkdir(parents=True)
    (tmp_path / "sweep" / "1").symlink_to(tmp_path)
    paths = {p.relative_to(tmp_path / "sweep").as_posix() for p in hydra_paths(tmp_path / "sweep", sweep=True)}
    assert {"multirun.yaml", "0", "1", "0/.hydra", "0/federate.log", "0/.hydra/config.yaml"} <= paths
    assert not any(p.startswith("1/") for p in paths)  # nothing is looked up through a link


@pytest.mark.slow
def test_a_linked_job_folder_of_a_sweep_is_refused(planted_cache, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "0").symlink_to(real)
    proc = run_cli("federate", "-m", f"cache_file={planted_cache}", "model.name=fedclip/planted",
                   "target_domain=target", "rounds=1", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 2 and "symbolic link" in proc.stdout and "Traceback" not in proc.stdout, proc.stdout
    assert list(real.iterdir()) == []


# ---------------------------------------------------------------- the Flower server
def test_the_flower_server_replaces_links_at_its_outputs(tmp_path, keep, monkeypatch):
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity
    from planted import planted, write_cache
    from test_flower import DOMAINS, FakeGrid, flower_cfg

    for attr in ("_run_id", "_task_id", "_node_id"):  # messages made outside a Flower runtime (tests/test_flower.py)
        monkeypatch.setattr(TaskIdentity, attr, 1)
    from federate.flower.server_app import serve

    cache = write_cache(tmp_path / "planted.h5", *planted(DOMAINS))
    out = tmp_path / "f"
    out.mkdir()
    (out / "splits.json").symlink_to(keep)
    (out / "adapter.safetensors").symlink_to(tmp_path / "dangling")
    serve(FakeGrid(), flower_cfg(cache, out, "rounds=1"), out)
    assert keep.read_text() == "keep" and not (tmp_path / "dangling").exists()
    assert regular(out / "splits.json") and regular(out / "adapter.safetensors")
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "linked").symlink_to(real)
    with pytest.raises(UnsafePath, match="symbolic link"):
        serve(FakeGrid(), flower_cfg(cache, tmp_path / "linked", "rounds=1"), tmp_path / "linked")
    assert list(real.iterdir()) == []


# ---------------------------------------------------------------- the image backbones
@pytest.mark.slow
@pytest.mark.skipif(not PACS_MINI.is_dir(), reason=f"{PACS_MINI} is absent")
def test_a_backbone_run_replaces_links_at_its_outputs(tmp_path, keep):
    from federate.run import run

    out = tmp_path / "b"
    out.mkdir()
    (out / "splits.json").symlink_to(keep)
    (out / "model.safetensors").symlink_to(tmp_path / "dangling")
    cfg = config("federate", [f"dataset.root={PACS_MINI}", "dataset.domains=[art_painting,cartoon]",
                              "method=fedavg_full", "backbone=alexnet", "backbone.image_size=64",
                              "backbone.num_workers=0", "rounds=1"])
    run(cfg, out)
    assert keep.read_text() == "keep" and not (tmp_path / "dangling").exists()
    assert regular(out / "splits.json") and regular(out / "model.safetensors")


# ---------------------------------------------------------------- the report
def fake_run(root: Path, name: str) -> Path:
    s = {"method": "fedclip", "dataset": "pacs", "model": "openai/clip-vit-base-patch32", "target_domain": "art_painting",
         "seed": 0, "lr": 1e-4, "rounds": 2, "val_mean": 0.5, "generalization": 0.5,
         "personalization": {"cartoon": 0.5}, "personalization_mean": 0.5, "overall": 0.5}
    (root / name).mkdir(parents=True)
    (root / name / "summary.json").write_text(json.dumps(s))
    (root / name / "history.jsonl").write_text(json.dumps(
        {"round": 1, "val_acc": {"cartoon": 0.5}, "val_mean": 0.5, "target_acc": 0.5}) + "\n")
    return root / name


TABLES = "pacs__openai--clip-vit-base-patch32"


def test_the_report_replaces_links_at_its_files(tmp_path, keep):
    from federate.report import report

    runs = tmp_path / "runs"
    fake_run(runs, "a")
    report(runs, make_plots=False)  # a report folder of this tool's, then links planted in it
    (runs / "report" / "per_round.csv").unlink()
    (runs / "report" / "per_round.csv").symlink_to(keep)
    (runs / "report" / "report.md").unlink()
    (runs / "report" / "report.md").symlink_to(tmp_path / "dangling.md")
    (runs / "report" / TABLES / "overall.csv").unlink()
    (runs / "report" / TABLES / "overall.csv").symlink_to(keep)
    (runs / "report" / TABLES / "accuracy_per_round.png").symlink_to(tmp_path / "dangling.png")
    report(runs, make_plots=True)
    assert keep.read_text() == "keep" and not (tmp_path / "dangling.md").exists()
    assert not (tmp_path / "dangling.png").exists()
    for path in ("per_round.csv", "report.md", f"{TABLES}/overall.csv"):
        assert regular(runs / "report" / path), path


@pytest.mark.parametrize("linked", ["report", f"report/{TABLES}"])
def test_the_report_refuses_a_linked_folder_in_one_line(tmp_path, linked):
    runs = tmp_path / "runs"
    fake_run(runs, "a")
    real = tmp_path / "real"
    real.mkdir()
    (runs / linked).parent.mkdir(parents=True, exist_ok=True)
    if linked != "report":
        (runs / "report" / "report.md").write_text("an earlier report\n")
    (runs / linked).symlink_to(real)
    proc = run_cli("federate.report", str(runs), "--no-plots", cwd=tmp_path)
    assert proc.returncode == 2 and "symbolic link" in proc.stdout and "Traceback" not in proc.stdout, proc.stdout
    assert list(real.iterdir()) == []


# ---------------------------------------------------------------- python -m federate.partition
def partition(cache, out):
    from federate.partition.plot import main

    main([str(cache), "--out", str(out)])


def test_the_partition_plot_refuses_links_at_its_files_and_a_linked_folder(planted_cache, tmp_path, keep):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plot"
    out.mkdir()
    (out / "label_distribution.png").symlink_to(tmp_path / "dangling.png")
    with pytest.raises((ConfigError, UnsafePath), match="label_distribution.png"):
        partition(planted_cache, out)
    assert not (tmp_path / "dangling.png").exists()
    (out / "label_distribution.png").unlink()
    (out / "label_distribution.csv").symlink_to(keep)
    with pytest.raises((ConfigError, UnsafePath), match="label_distribution.csv"):
        partition(planted_cache, out)
    assert keep.read_text() == "keep"
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "linked").symlink_to(real)
    with pytest.raises((ConfigError, UnsafePath), match="symbolic link"):
        partition(planted_cache, tmp_path / "linked")
    assert list(real.iterdir()) == []


# ---------------------------------------------------------------- extract's cache, the demo, the tiny model
def store(path: Path):
    from extract.cache import PartialStore

    return PartialStore.open(path, {"model": "m"}, 1, False)


def test_the_cache_writer_replaces_a_link_at_the_cache_and_refuses_a_linked_folder(tmp_path, keep):
    import numpy as np

    from extract.cache import exclusive_lock
    from extract.errors import ExtractError

    folder = tmp_path / "cache" / "demo"
    folder.mkdir(parents=True)
    path = folder / "m.h5"
    path.symlink_to(tmp_path / "dangling.h5")
    with exclusive_lock(path):
        s = store(path)
        s.commit(0, 2, np.ones((2, 4), np.float32), ["a", "b"], [0, 1], [], "float32", 4)

        class Domain:
            name, skipped = "d", []

            def __len__(self):
                return 2
        s.assemble({"schema_version": 1}, np.ones((1, 2, 4), np.float32), 100.0, [Domain()], 4, "float32")
    assert regular(path) and not (tmp_path / "dangling.h5").exists()
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "cache" / "linked").symlink_to(real)
    with pytest.raises(ExtractError, match="symbolic link"):
        with exclusive_lock(tmp_path / "cache" / "linked" / "m.h5"):
            pass
    assert list(real.iterdir()) == []
    (folder / "other.h5.partial").symlink_to(real)
    with pytest.raises(ExtractError, match="symbolic link"):
        store(folder / "other.h5")
    assert list(real.iterdir()) == []


def test_the_demo_generator_refuses_a_linked_folder(tmp_path):
    from extract.demo import ensure_demo_images
    from extract.errors import ExtractError

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "demo").symlink_to(real)
    with pytest.raises(ExtractError, match="symbolic link"):
        ensure_demo_images(tmp_path / "demo", ["photo"], ["circle"], 2, 16, 0)
    assert list(real.iterdir()) == []
    ensure_demo_images(tmp_path / "own", ["photo"], ["circle"], 2, 16, 0)
    (tmp_path / "own" / "photo" / "circle").rename(tmp_path / "moved")
    (tmp_path / "own" / "photo" / "circle").symlink_to(real)  # a class folder replaced by a link
    with pytest.raises(ExtractError, match="symbolic link"):
        ensure_demo_images(tmp_path / "own", ["photo"], ["circle"], 3, 16, 0)
    assert list(real.iterdir()) == []


def test_the_tiny_model_is_never_built_through_a_link(tmp_path):
    from omegaconf import OmegaConf

    from extract.errors import ExtractError
    from extract.model import resolve_model

    real = tmp_path / "real"
    real.mkdir()
    cfg = OmegaConf.create({"name": "fedclip/tiny", "revision": None, "build": {
        "seed": 0, "embed_dim": 8, "hidden_size": 8, "layers": 1, "heads": 1, "image_size": 16, "patch_size": 8}})
    (tmp_path / "c1").mkdir()
    (tmp_path / "c1" / "models").symlink_to(real)
    with pytest.raises(ExtractError, match="symbolic link"):
        resolve_model(cfg, str(tmp_path / "c1"))
    (tmp_path / "c2" / "models").mkdir(parents=True)
    (tmp_path / "c2" / "models" / "fedclip--tiny.partial").symlink_to(real)
    with pytest.raises(ExtractError, match="symbolic link"):
        resolve_model(cfg, str(tmp_path / "c2"))
    assert list(real.iterdir()) == []
