"""Messages a newcomer meets: every suggested command is the exact command to run, with the user's own
settings and no placeholder; an unreachable hub fails in seconds; extract leaves no lock file behind;
`python -m extract.info` on a missing file is one line; transformers' own progress bars stay quiet."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from conftest import ROOT, config, draw_shapes, run_cli

from extract import info, pipeline
from extract.cache import LOCK_MARK, exclusive_lock
from extract.model import build_tiny_clip, load_clip, resolve_model

PLACEHOLDER = re.compile(r"<[a-z][a-z ]*>")  # <name>, <path>, <another path>, ...


def error_line(proc) -> str:
    lines = [line for line in proc.stdout.splitlines() if "[ERROR]" in line]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stdout, proc.stdout
    assert not PLACEHOLDER.search(lines[0]), lines[0]
    return lines[0]


@pytest.mark.slow
def test_a_missing_cache_names_the_extract_command_with_the_users_settings(tmp_path):
    line = error_line(run_cli("federate", "dataset=vlcs", "model=tiny_random", f"cache_file={tmp_path}/v.h5", "lr=1e-3",
                              f"hydra.run.dir={tmp_path}/o", cwd=tmp_path))
    assert (f"build it with: python -m extract dataset=vlcs model=tiny_random cache_file={tmp_path}/v.h5 "
            "dataset.root=/path/to/vlcs,") in line  # lr is federate's own: not repeated


@pytest.mark.slow
def test_a_folder_dataset_without_root_names_the_exact_command(tmp_path):
    line = error_line(run_cli("extract", "dataset=folder", "model=tiny_random", f"cache_dir={tmp_path}/c",
                              cwd=tmp_path))
    assert line.endswith(f"run: python -m extract dataset=folder model=tiny_random cache_dir={tmp_path}/c "
                         "dataset.root=/path/to/dataset"), line


def offline_extract(tmp_path, env: dict, *overrides: str):
    """`python -m extract ...` with `env` and an empty HF cache; (the process, its wall time in seconds)."""
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY",
                                                              "https_proxy", "ALL_PROXY", "all_proxy")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "extract", *overrides, f"cache_dir={tmp_path}/c"], cwd=tmp_path,
                          env={**base, **env, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
    return proc, time.perf_counter() - start


@pytest.fixture(scope="module")
def startup_seconds(tmp_path_factory):
    """What the same command takes to fail before it reaches the hub (VLCS has no hub copy): the time to
    start Python and import the libraries, which a loaded machine stretches."""
    proc, seconds = offline_extract(tmp_path_factory.mktemp("startup"), {}, "dataset=vlcs")
    assert "has no hub copy" in error_line(proc)
    return seconds


@pytest.mark.slow
@pytest.mark.parametrize("env", [{"HF_ENDPOINT": "https://hub.invalid"}, {"HF_HUB_OFFLINE": "1"}])
def test_an_unreachable_hub_fails_in_seconds_with_one_line(tmp_path, env, startup_seconds):
    # An endpoint that cannot resolve (.invalid never does) stands for a machine without internet, on any CI.
    proc, seconds = offline_extract(tmp_path, env, "dataset=pacs")
    line = error_line(proc)
    assert "Retry" not in proc.stdout and "cannot load hub dataset 'flwrlabs/pacs'" in line
    assert ("HF_HUB_OFFLINE=1 is set" if env.get("HF_HUB_OFFLINE") else "the hub (hub.invalid) cannot be reached") in line
    assert line.endswith(f"run: python -m extract dataset=pacs cache_dir={tmp_path}/c dataset.root=/path/to/pacs")
    # Beyond starting up: importing `datasets` and the 3 s reachability check. The retries it replaced
    # slept 23 s (1 + 2 + 4 + 8 + 8), which no machine load shortens.
    assert seconds - startup_seconds < 12, (seconds, startup_seconds)


def test_extract_removes_its_lock_file_and_only_its_own(tmp_path, tiny_model):
    root = draw_shapes(tmp_path / "shapes", per_class=1, seed=0)
    path = pipeline.run(config("extract", ["dataset=folder", f"dataset.root={root}", f"model.name={tiny_model}",
                                           f"cache_file={tmp_path / 'c.h5'}", "num_workers=0"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "shapes"]
    foreign = tmp_path / "d.h5.lock"
    foreign.write_text("a file fedclip did not write")
    with exclusive_lock(tmp_path / "d.h5"):
        pass
    assert foreign.read_text() == "a file fedclip did not write"
    with exclusive_lock(tmp_path / "e.h5"):
        assert (tmp_path / "e.h5.lock").read_bytes() == LOCK_MARK
    assert not (tmp_path / "e.h5.lock").exists() and path.exists()


def test_info_on_a_missing_file_is_one_line(tmp_path, capsys):
    assert info.main([str(tmp_path / "nope.h5")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nope.h5'} does not exist\n", err


def test_transformers_progress_bars_are_silent(tmp_path, capfd):
    build_tiny_clip(tmp_path / "m", seed=0, embed_dim=16, hidden_size=16, layers=1, heads=2, image_size=16,
                    patch_size=8)
    cfg = config("extract", [f"model.name={tmp_path / 'm'}"])
    load_clip(resolve_model(cfg.model, str(tmp_path)), pipeline.resolve_device("cpu"))
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err
