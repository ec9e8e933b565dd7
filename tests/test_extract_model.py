"""The model by content: fingerprints, cache names without local paths, one-line load errors (with the tiny
random CLIP), and resumes refused after the weights changed."""
from __future__ import annotations

import json
import shutil
from functools import partial

import h5py
import pytest
from conftest import config, draw_shapes
from planted import one_line

from extract import cache as cachefile
from extract import pipeline
from extract.errors import ExtractError
from extract.identity import model_display_name, model_fingerprint


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return draw_shapes(tmp_path_factory.mktemp("small") / "shapes", per_class=2, seed=2)


def run(root, model, tmp, *extra):
    return pipeline.run(config("extract", ["dataset=folder", f"dataset.root={root}", f"model.name={model}",
                                           f"cache_dir={tmp / 'cache'}", "num_workers=0", "batch_size=2", *extra]))


error = partial(one_line, ExtractError)


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def flip_a_weight(directory):
    """Change one byte of tensor data: still a valid safetensors file, other weights."""
    f = directory / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x40
    f.write_bytes(bytes(data))


def test_the_fingerprint_is_the_content_not_the_path(tiny_model, tmp_path):
    copy = copy_model(tiny_model, tmp_path / "elsewhere" / "my-clip")
    assert model_fingerprint(copy) == model_fingerprint(tiny_model)
    config_json = json.loads((copy / "config.json").read_text())
    config_json["transformers_version"] = "0.0.1"  # re-saved by another transformers: same model
    (copy / "config.json").write_text(json.dumps(config_json, indent=4))
    assert model_fingerprint(copy) == model_fingerprint(tiny_model)
    flip_a_weight(copy)
    assert model_fingerprint(copy) != model_fingerprint(tiny_model)
    other = copy_model(tiny_model, tmp_path / "tok")
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"] = tok["added_tokens"][:1]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    assert model_fingerprint(other) != model_fingerprint(tiny_model)


def test_the_cache_names_the_model_by_its_folder_name_never_its_path(tiny_model, tmp_path, small_root):
    copy = copy_model(tiny_model, tmp_path / "models" / "clip-copy")
    path = run(small_root, copy, tmp_path)
    assert path == tmp_path / "cache" / "shapes" / "clip-copy.h5"
    with h5py.File(path, "r") as f:
        assert f.attrs["model_name"] == "clip-copy" == model_display_name(str(copy))
        assert f.attrs["model_fingerprint"] == model_fingerprint(tiny_model) and f.attrs["model_source"] == "local"
    assert model_display_name("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"
    assert cachefile.default_cache_path("c", "pacs", "openai/clip-vit-base-patch32").name == \
        "openai--clip-vit-base-patch32.h5"


def test_a_checkpoint_that_misses_tensors_is_refused(tiny_model, tmp_path, small_root):
    from safetensors.torch import load_file, save_file

    broken = copy_model(tiny_model, tmp_path / "missing")
    tensors = load_file(broken / "model.safetensors")
    del tensors["text_model.encoder.layers.0.layer_norm2.bias"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    error(lambda: run(small_root, broken, tmp_path), "lacks 1 of the CLIP model's tensors",
          "text_model.encoder.layers.0.layer_norm2.bias", "randomly initialised")


def test_missing_or_empty_tokenizer_files_are_refused(tiny_model, tmp_path, small_root):
    from transformers import CLIPTokenizer

    bare = copy_model(tiny_model, tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    error(lambda: run(small_root, bare, tmp_path), "tokenizer files are missing in model folder", str(bare))
    # a tokenizer that knows no symbol: every class prompt would become the same tokens
    CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[]).save_pretrained(bare)
    error(lambda: run(small_root, bare, tmp_path), "into the same tokens", "tokenizer files are incomplete")


@pytest.mark.parametrize("damage", ["truncated", "bad header"])
def test_a_damaged_safetensors_file_is_refused(tiny_model, tmp_path, small_root, damage):
    broken = copy_model(tiny_model, tmp_path / "damaged")
    f = broken / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:8] + b"{garbage" + data[16:])
    error(lambda: run(small_root, broken, tmp_path), "cannot load the weights of CLIP model", "SafetensorError",
          "damaged")


def test_missing_model_folders_and_unknown_hub_ids_are_one_line(tmp_path, small_root, monkeypatch):
    error(lambda: run(small_root, "/no/such/model", tmp_path), "model folder /no/such/model does not exist",
          "model.name=/path/to/clip-vit-base-patch32")
    error(lambda: run(small_root, "./models/clip", tmp_path), "model folder ./models/clip does not exist")
    (tmp_path / "weights.bin").write_bytes(b"x")
    error(lambda: run(small_root, tmp_path / "weights.bin", tmp_path), "is a file, not a folder")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    error(lambda: run(small_root, empty, tmp_path), "no safetensors weights in model folder")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    error(lambda: run(small_root, "fedclip-tests/no-such-model", tmp_path),
          "cannot get CLIP model 'fedclip-tests/no-such-model' from the hub or its local cache",
          "model.name=/path/to/clip-vit-base-patch32")


def test_a_resume_after_the_weights_changed_is_refused(tiny_model, tmp_path, small_root, monkeypatch):
    model = copy_model(tiny_model, tmp_path / "m" / "clip")
    real, calls = pipeline.image_embeddings, {"n": 0}

    def interrupted(m, pixels):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(m, pixels)

    monkeypatch.setattr(pipeline, "image_embeddings", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(small_root, model, tmp_path)
    monkeypatch.setattr(pipeline, "image_embeddings", real)
    before = model_fingerprint(model)
    flip_a_weight(model)
    after = model_fingerprint(model)
    error(lambda: run(small_root, model, tmp_path), "unfinished extraction with other settings",
          f"model_fingerprint {before[:19]} (now {after[:19]})", "overwrite=true")
    path = run(small_root, model, tmp_path, "overwrite=true")  # starts over with the new weights only
    with h5py.File(path, "r") as f:
        assert f.attrs["model_fingerprint"] == after
