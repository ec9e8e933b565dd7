from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
# One intra-op thread for torch, here and in the CLIs the tests start: the tests' tensors are tiny, and on a
# shared 2-core machine two spinning threads per process make a test 5-15x slower than one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Real images beside the clone (../shared); tests that need them skip without them. FEDCLIP_SHARED points
# elsewhere, or at a missing folder to check that the suite passes on a plain clone (.ci/run does).
PACS_MINI = Path(os.environ.get("FEDCLIP_SHARED", ROOT.parent / "shared")) / "datasets" / "pacs-mini"
sys.path.insert(0, str(Path(__file__).parent))  # tests/planted.py


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m <args>` as a user would, offline; .stdout holds the terminal output (both streams)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def config(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


PLANTED_SIZES = {"alpha": 260, "beta": 200, "gamma": 150, "target": 240}


@pytest.fixture(scope="session")
def planted_cache(tmp_path_factory) -> Path:
    """A planted cache (tests/planted.py) of 3 participants and a held-out domain named target."""
    from planted import planted, write_cache

    domains, text = planted(PLANTED_SIZES)
    return write_cache(tmp_path_factory.mktemp("planted") / "planted.h5", domains, text)


def run_federate(cache_file, out, *overrides, rounds: int = 15):
    """One in-process federate run on a planted cache (target domain `target`, lr 1e-3)."""
    from federate.run import run

    cfg = config("federate", [f"cache_file={cache_file}", "model.name=fedclip/planted", "target_domain=target",
                              f"rounds={rounds}", "lr=1e-3", *overrides])
    return run(cfg, out)


def outputs(out: Path) -> tuple:
    """A finished run's summary.json (less its wall time), history.jsonl and adapter, to compare runs."""
    import json

    from safetensors.torch import load_file

    summary = json.loads((out / "summary.json").read_text())
    summary.pop("wall_seconds")
    return summary, (out / "history.jsonl").read_text(), load_file(out / "adapter.safetensors")


def same_outputs(a: tuple, b: tuple) -> None:
    """Two runs' `outputs` are identical: the same summary and history, the same adapter bits."""
    import torch

    assert a[0] == b[0] and a[1] == b[1]
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def draw_shapes(root: Path, per_class: int, seed: int) -> Path:
    """<root>/<domain>/<class>/<i>.png: 2 domains x 2 classes x per_class images of 16 px."""
    import random

    from extract.demo import draw

    rng = random.Random(seed)
    for d in ("photo", "sketch"):
        for c in ("circle", "square"):
            (root / d / c).mkdir(parents=True)
            for i in range(per_class):
                draw(c, d, 16, rng).save(root / d / c / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random CLIP saved with save_pretrained (weights, byte-level tokenizer, processor)."""
    from extract.model import build_tiny_clip

    path = tmp_path_factory.mktemp("models") / "tiny-clip"
    build_tiny_clip(path, seed=0, embed_dim=32, hidden_size=32, layers=2, heads=2, image_size=32, patch_size=8)
    return path


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    """<root>/<domain>/<class>/<image>: 2 domains x 2 classes x 6 images, in several file formats and modes."""
    import random

    from extract.demo import draw

    root = tmp_path_factory.mktemp("images") / "shapes"
    rng = random.Random(0)
    for domain in ("photo", "sketch"):
        for cls in ("circle", "Square_Thing"):
            folder = root / domain / cls
            folder.mkdir(parents=True)
            for i in range(6):
                draw(cls.split("_")[0].lower(), domain, 48, rng).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
    odd = draw("circle", "photo", 48, rng)
    odd.convert("L").save(root / "photo" / "circle" / "gray.png")
    odd.convert("RGBA").save(root / "photo" / "circle" / "rgba.png")
    odd.convert("P").save(root / "photo" / "circle" / "palette.png")
    odd.convert("CMYK").save(root / "photo" / "circle" / "cmyk.jpg")
    return root


@pytest.fixture
def workdir(tmp_path) -> Path:
    return tmp_path


def pytest_collection_modifyitems(items):
    """With pytest-xdist (`-n 2 --dist loadgroup`), the tests that start Flower's simulation engine (Ray) run in
    one worker, one after another: two Ray clusters at once on 2 cores would wait out each other's timeouts."""
    for item in items:
        if "simulation" in item.name:  # (every test that starts the engine says so in its name)
            item.add_marker(pytest.mark.xdist_group("flower"))
