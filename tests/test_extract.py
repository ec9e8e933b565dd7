"""Stage 1: the extract CLI, the cache it writes, resume, and its error paths."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from conftest import PACS_MINI, config, run_cli
from PIL import Image

from extract import pipeline
from extract.cache import exclusive_lock
from extract.errors import ExtractError


def extract_args(root, model, workdir, *extra):
    return ("extract", "dataset=folder", f"dataset.root={root}", f"model.name={model}",
            f"cache_dir={workdir / 'cache'}", f"hydra.run.dir={workdir / 'out'}", *extra)


def read(path):
    with h5py.File(path, "r") as f:
        out = {"attrs": dict(f.attrs), "text": f["text/embeddings"][()], "scale": f["text/logit_scale"][()]}
        for d in json.loads(f.attrs["domains"]):
            g = f[f"domains/{d}"]
            out[d] = {k: g[k][()] for k in ("image_embeddings", "labels", "ids")}
            out[d]["skipped"] = [s.decode() for s in g["skipped/ids"][()]]
            out[d]["reasons"] = [s.decode() for s in g["skipped/reasons"][()]]
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, image_root, tiny_model):
    """One real CLI extraction over the generated folder, shared by the tests that only read it."""
    work = tmp_path_factory.mktemp("extract")
    proc = run_cli(*extract_args(image_root, tiny_model, work), cwd=work)
    assert proc.returncode == 0, proc.stdout
    path = work / "cache" / "shapes" / (tiny_model.name + ".h5")  # a local model: its folder's name
    return path, proc, work


@pytest.mark.slow
def test_cli_writes_a_complete_cache_in_the_documented_schema(built, tiny_model):
    path, proc, _ = built
    assert path.exists() and not path.with_name(path.name + ".partial").exists()
    c = read(path)
    a = c["attrs"]
    assert a["schema_version"] == 1 and a["complete"] == True  # noqa: E712 (numpy bool)
    assert a["model_name"] == tiny_model.name and a["dataset_name"] == "shapes" and a["embed_dim"] == 32
    from extract.identity import model_fingerprint
    assert a["model_fingerprint"] == model_fingerprint(tiny_model) and a["model_fingerprint"].startswith("sha256:")
    assert json.loads(a["domains"]) == ["photo", "sketch"]
    assert json.loads(a["class_names"]) == ["Square_Thing", "circle"]
    assert json.loads(a["prompt_names"]) == ["square thing", "circle"]
    assert json.loads(a["prompt_templates"]) == ["a picture of a {}"]
    from transformers import CLIPModel
    assert a["model_num_parameters"] == sum(p.numel() for p in CLIPModel.from_pretrained(tiny_model).parameters())
    for key in ("model_revision", "versions", "preprocessing", "created_at", "source", "identity_sha256"):
        assert key in a
    assert c["text"].shape == (1, 2, 32) and c["text"].dtype == np.float32
    # 12 drawn images per domain, plus grayscale, RGBA, palette and CMYK files in photo/circle
    assert len(c["photo"]["ids"]) == 16 and len(c["sketch"]["ids"]) == 12
    assert c["photo"]["image_embeddings"].shape == (16, 32) and c["photo"]["labels"].dtype == np.int64
    ids = [s.decode() for s in c["photo"]["ids"]]
    assert len(set(ids)) == len(ids) and "photo/circle/cmyk.jpg" in ids
    assert all(lab == (0 if "Square" in i else 1) for i, lab in zip(ids, c["photo"]["labels"]))
    assert "wrote" in proc.stdout and "28 images" in proc.stdout


@pytest.mark.slow
def test_embeddings_equal_what_transformers_computes_directly(built, image_root, tiny_model):
    from transformers import AutoTokenizer, CLIPModel

    from extract.model import image_processor_class

    path, _, _ = built
    c = read(path)
    model = CLIPModel.from_pretrained(tiny_model).eval()
    processor = image_processor_class().from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = [s.decode() for s in c["photo"]["ids"]]
    for name in ("photo/circle/cmyk.jpg", "photo/circle/rgba.png", "photo/Square_Thing/1.jpg"):
        pixels = processor(images=Image.open(image_root / name), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            expected = model.get_image_features(pixel_values=pixels).pooler_output[0].numpy()
        np.testing.assert_allclose(c["photo"]["image_embeddings"][ids.index(name)], expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        tokens = tokenizer(["a picture of a square thing", "a picture of a circle"], padding=True, return_tensors="pt")
        text = model.get_text_features(**tokens).pooler_output.numpy()
    np.testing.assert_allclose(c["text"][0], text, rtol=1e-4, atol=1e-5)
    assert c["scale"] == pytest.approx(model.logit_scale.exp().item())


@pytest.mark.slow
def test_info_verifies_checksums_and_detects_tampering(built):
    path, _, work = built
    proc = run_cli("extract.info", str(path), cwd=work)
    assert proc.returncode == 0, proc.stdout
    assert "complete:     True" in proc.stdout and "verified" in proc.stdout and "photo" in proc.stdout
    tampered = work / "tampered.h5"
    shutil.copy(path, tampered)
    with h5py.File(tampered, "a") as f:
        f["domains/sketch/image_embeddings"][0, 0] += 1.0
    proc = run_cli("extract.info", str(tampered), cwd=work)
    assert proc.returncode == 1 and "MISMATCH in /domains/sketch/image_embeddings" in proc.stdout


@pytest.mark.slow
def test_rerun_does_nothing_and_overwrite_rebuilds(built, image_root, tiny_model):
    path, _, work = built
    before = path.stat().st_mtime_ns
    proc = run_cli(*extract_args(image_root, tiny_model, work), cwd=work)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout and path.stat().st_mtime_ns == before
    cfg = config("extract", list(extract_args(image_root, tiny_model, work, "overwrite=true", "num_workers=0"))[1:-1])
    assert pipeline.run(cfg) == path and path.stat().st_mtime_ns != before


@pytest.mark.slow
def test_interrupted_extraction_resumes_to_the_same_file(tmp_path, image_root, tiny_model, monkeypatch):
    overrides = list(extract_args(image_root, tiny_model, tmp_path, "batch_size=4", "num_workers=0"))[1:-1]
    reference = pipeline.run(config("extract", overrides + ["cache_file=" + str(tmp_path / "ref.h5")]))

    real, calls = pipeline.image_embeddings, {"n": 0}

    def dies_on_the_sixth_batch(model, pixels):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(model, pixels)

    monkeypatch.setattr(pipeline, "image_embeddings", dies_on_the_sixth_batch)
    target = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(config("extract", overrides + [f"cache_file={target}"]))
    partial = target.with_name(target.name + ".partial")
    assert not target.exists() and (partial / "header.json").exists()
    # photo (16 images) took 4 batches, then sketch committed one batch of 4 before the interruption
    assert len(list((partial / "d000").glob("*.npz"))) == 4 and len(list((partial / "d001").glob("*.npz"))) == 1
    monkeypatch.setattr(pipeline, "image_embeddings", real)
    calls["n"] = 0
    pipeline.run(config("extract", overrides + [f"cache_file={target}"]))
    a, b = read(reference), read(target)
    for d in ("photo", "sketch"):
        for key in ("image_embeddings", "labels", "ids"):
            np.testing.assert_array_equal(a[d][key], b[d][key])
    np.testing.assert_array_equal(a["text"], b["text"])


@pytest.mark.slow
def test_bad_images_are_skipped_and_recorded_or_fail_with_one_line(tmp_path, image_root, tiny_model):
    root = tmp_path / "bad"
    shutil.copytree(image_root, root)
    good = (root / "sketch" / "circle" / "1.jpg").read_bytes()
    (root / "sketch" / "circle" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "sketch" / "circle" / "notes.jpg").write_text("not an image")
    proc = run_cli(*extract_args(root, tiny_model, tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    c = read(next((tmp_path / "cache" / "bad").glob("*.h5")))
    assert sorted(c["sketch"]["skipped"]) == ["sketch/circle/notes.jpg", "sketch/circle/truncated.jpg"]
    assert all(r for r in c["sketch"]["reasons"]) and len(c["sketch"]["ids"]) == 12
    assert "skipping unreadable image sketch/circle/notes.jpg" in proc.stdout

    proc = run_cli(*extract_args(root, tiny_model, tmp_path, "on_bad_image=fail", "cache_file=" + str(tmp_path / "f.h5")),
                   cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout
    assert "cannot read image sketch/circle/notes.jpg" in proc.stdout or "truncated.jpg" in proc.stdout
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["dataset=nope"], "dataset=nope is not an option of dataset; choose one of cifar10, cifar100, demo, domainnet, "
                       "folder, office_home, pacs, vlcs"),
    (["dataset=folder", "dataset.root=/no/such/folder"], "does not exist"),
    (["dataset=folder", "dataset.root={empty}"], "no images under"),
    (["dataset=folder", "dataset.root={images}", "dataset.domains=[photo,nope]"], "domain nope not found"),
    (["dataset=folder", "dataset.root={images}", "model.name=/no/such/model"], "model folder /no/such/model does not exist"),
    (["dataset=folder", "dataset.root={images}", "model.name={model}", "on_bad_image=maybe"],
     "Invalid value 'maybe', expected one of [skip, fail]"),
])
def test_bad_input_gets_one_line_and_no_traceback(tmp_path, image_root, tiny_model, overrides, message):
    (tmp_path / "empty" / "d" / "c").mkdir(parents=True)
    fill = {"empty": tmp_path / "empty", "images": image_root, "model": tiny_model}
    args = [o.format(**fill) for o in overrides]
    proc = run_cli("extract", *args, f"cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/out", cwd=tmp_path)
    assert proc.returncode != 0 and message in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stdout


def test_a_second_writer_is_refused(tmp_path):
    path = tmp_path / "c.h5"
    with exclusive_lock(path):
        with pytest.raises(ExtractError, match="another extract process is writing"):
            with exclusive_lock(path):
                pass


@pytest.mark.slow
@pytest.mark.skipif(not PACS_MINI.exists(), reason="needs ../shared/datasets/pacs-mini")
def test_pacs_mini_through_the_pacs_config(tmp_path, tiny_model):
    cfg = config("extract", ["dataset=pacs", f"dataset.root={PACS_MINI}", f"model.name={tiny_model}",
                             f"cache_dir={tmp_path}", "num_workers=1"])
    c = read(pipeline.run(cfg))
    assert json.loads(c["attrs"]["domains"]) == ["art_painting", "cartoon", "photo", "sketch"]
    assert json.loads(c["attrs"]["class_names"])[0] == "dog" and c["attrs"]["dataset_name"] == "pacs"
    for d in ("art_painting", "cartoon", "photo", "sketch"):
        assert len(c[d]["ids"]) == 70 and sorted(set(c[d]["labels"])) == list(range(7)) and not c[d]["skipped"]
