"""Verification where it matters, on load: federate checks every checksum it reads, labels and ids, and the
model by content; `python -m extract.info` fails on any problem. Corruptions are made with h5py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import ROOT
from planted import corrupt, planted, refused, write_cache

from extract import info
from extract.cache import default_cache_path as extract_default_path
from extract.identity import buffer_sha256, identity_sha256, model_fingerprint, strings_sha256
from federate.cache import _load, default_cache_path, load_cache

PACS_SIZES = {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    domains, text = planted({"a": 30, "b": 20}, classes=4, dim=24)
    return write_cache(tmp_path_factory.mktemp("verify") / "good.h5", domains, text)


def flip_a_float(f):
    x = f["domains/b/image_embeddings"]
    row = x[3]
    row[5] = np.frombuffer((np.float32(row[5]).view(np.uint32) ^ np.uint32(1)).tobytes(), np.float32)[0]  # one bit
    x[3] = row


def permute_rows(f):
    x = f["domains/a/image_embeddings"]
    x[...] = x[()][::-1]


def rehash_strings(ds, values):
    ds[...] = np.array(values, dtype=object)
    ds.attrs["sha256"] = strings_sha256(values)


def duplicate_id(f):  # a consistent edit: the checksum is updated too, the content check still refuses
    ids = [s.decode() for s in f["domains/a/ids"][()]]
    ids[1] = ids[0]
    rehash_strings(f["domains/a/ids"], ids)


def negative_label(f, rehash=True):
    y = f["domains/b/labels"][()]
    y[0] = -1
    f["domains/b/labels"][...] = y
    if rehash:
        f["domains/b/labels"].attrs["sha256"] = __import__("hashlib").sha256(y.tobytes()).hexdigest()


@pytest.mark.parametrize("edit, match", [
    (flip_a_float, "checksum mismatch in /domains/b/image_embeddings"),
    (permute_rows, "checksum mismatch in /domains/a/image_embeddings"),
    (duplicate_id, "domain a of"),
    (lambda f: negative_label(f, rehash=False), "checksum mismatch in /domains/b/labels"),
    (negative_label, "has label -1, outside 0..3"),
    (lambda f: f["domains/a/ids"].attrs.__setitem__("sha256", "0" * 64), "checksum mismatch in /domains/a/ids"),
    (lambda f: f["text/embeddings"].__setitem__((0, 0, 0), 9.0), "checksum mismatch in /text/embeddings"),
    (lambda f: f["text/logit_scale"].__setitem__((), 50.0), "checksum mismatch in /text/logit_scale"),
    (lambda f: f.attrs.__setitem__("class_names", json.dumps(["class1", "class0", "class2", "class3"])),
     "checksum mismatch in the identity attributes"),
    (lambda f: f.attrs.__setitem__("model_name", "other/model"), "checksum mismatch in the identity attributes"),
    (lambda f: f.attrs.__delitem__("prompt_templates"), "checksum mismatch in the identity attributes"),
    (lambda f: f.__delitem__("text"), "has no /text/embeddings"),
    (lambda f: f.__delitem__("domains/b/labels"), "does not follow the cache schema"),
])
def test_every_corruption_of_what_federate_reads_is_one_line(good, tmp_path, edit, match):
    refused(corrupt(good, tmp_path, edit), match)


def test_duplicated_ids_are_named(good, tmp_path):
    assert "has duplicated id 'a/00000'" in refused(corrupt(good, tmp_path, duplicate_id))


def test_only_what_is_read_is_verified(good, tmp_path):
    path = corrupt(good, tmp_path, flip_a_float)  # domain b is damaged
    _load.cache_clear()
    assert list(load_cache(path, domains=("a",)).domains) == ["a"]  # a Flower client of domain a reads only a
    assert load_cache(path, domains=()).domains == {}
    refused(path, "/domains/b/image_embeddings", domains=("b",))


def test_a_cache_of_an_older_fedclip_asks_for_a_rebuild(tmp_path):
    domains, text = planted({"a": 10}, classes=3, dim=24)
    old = write_cache(tmp_path / "old.h5", domains, text, checksums=False)
    refused(old, "no checksum for its identity attributes", "older fedclip", "overwrite=true")
    with h5py.File(old, "a") as f:  # identity hashed, datasets not (an extract cache of the previous version)
        f.attrs["identity_sha256"] = identity_sha256(f.attrs)
        f["text/embeddings"].attrs["sha256"] = buffer_sha256(f["text/embeddings"][()])
    refused(old, "no checksum for /text/logit_scale", "overwrite=true")


def test_the_model_is_checked_by_content(tiny_model, tmp_path):
    domains, text = planted({"a": 10}, classes=3, dim=24)
    fp = model_fingerprint(tiny_model)
    path = write_cache(tmp_path / "c.h5", domains, text, model_name="tiny-clip", model_fingerprint=fp)
    colleague = tmp_path / "colleague" / "weights"
    shutil.copytree(tiny_model, colleague)
    _load.cache_clear()
    assert load_cache(path, str(colleague)).model_fingerprint == fp  # same weights at another path
    assert load_cache(path, "tiny-clip").model_name == "tiny-clip"  # the cache's own model name
    data = bytearray((colleague / "model.safetensors").read_bytes())
    data[-5] ^= 0x40
    (colleague / "model.safetensors").write_bytes(bytes(data))
    refused(path, "but the weights in", "differ", "model.name=tiny-clip", model_name=str(colleague))
    refused(path, "was built with model 'tiny-clip', not model.name='openai/clip-vit-base-patch32'",
            "pass model.name=tiny-clip (or a local folder with the same weights)",
            model_name="openai/clip-vit-base-patch32")
    old = write_cache(tmp_path / "old.h5", domains, text, model_name="tiny-clip")  # no fingerprint recorded
    refused(old, "records no model fingerprint", model_name=str(tiny_model))


def test_default_paths_agree_between_the_stages_and_hold_no_local_path(tiny_model):
    for name in (str(tiny_model), "openai/clip-vit-base-patch32", "fedclip/tiny-random-clip"):
        assert default_cache_path("cache", "pacs", name) == extract_default_path("cache", "pacs", name)
    assert default_cache_path("cache", "pacs", str(tiny_model)).name == tiny_model.name + ".h5"
    assert default_cache_path("cache", "demo", "fedclip/tiny-random-clip").name == "fedclip--tiny-random-clip.h5"


def test_federate_checks_a_model_folder_without_importing_transformers(tiny_model, tmp_path):
    domains, text = planted({"a": 10}, classes=3, dim=24)
    path = write_cache(tmp_path / "c.h5", domains, text, model_name="tiny-clip",
                       model_fingerprint=model_fingerprint(tiny_model))
    code = ("import sys; from federate.cache import load_cache; load_cache(sys.argv[1], sys.argv[2]);"
            "print(sorted(m for m in ('transformers', 'torch', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tiny_model)], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "transformers" not in out and "huggingface_hub" not in out, out


# --- python -m extract.info -------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, line", [
    (lambda f: None, None),
    (lambda f: f.attrs.__setitem__("schema_version", 7), "schema version 7 is not the version this fedclip reads"),
    (lambda f: f.__delitem__("text"), "/text/embeddings is missing"),
    (lambda f: f.attrs.__setitem__("dataset_name", "renamed"), "checksum MISMATCH in the identity attributes"),
    (lambda f: f["text/logit_scale"].__setitem__((), 1.0), "checksum MISMATCH in /text/logit_scale"),
    (flip_a_float, "checksum MISMATCH in /domains/b/image_embeddings"),
])
def test_info_fails_on_every_problem(good, tmp_path, capsys, edit, line):
    code = info.main([str(corrupt(good, tmp_path, edit))])
    out = capsys.readouterr().out
    if line is None:
        assert code == 0 and "checksums:    all 9 verified" in out, out
    else:
        assert code == 1 and line in out and "FAILED" in out, out


# --- speed ----------------------------------------------------------------------------------------------------

def test_verifying_a_pacs_sized_cache_takes_well_under_a_second(tmp_path):
    domains, text = planted(PACS_SIZES, classes=7, dim=512, style_dims=64, noise=1.0)
    path = write_cache(tmp_path / "pacs_sized.h5", domains, text, dataset_name="pacs_sized")
    best = float("inf")
    for _ in range(3):
        _load.cache_clear()
        t = time.perf_counter()
        cache = load_cache(path, "fedclip/planted")
        best = min(best, time.perf_counter() - t)
    assert sum(len(d.ids) for d in cache.domains.values()) == 9991
    print(f"load + verify of a PACS-sized cache: {best:.3f} s")
    assert best < 1.0
