"""A cache is hostile input: links out of the file, declared sizes it does not store, mistyped attributes,
names that lead outside a folder, unusable vectors and empty domains are refused with one line, by
federate (load_cache) and by `python -m extract.info`, before anything big is read."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import ROOT, run_federate
from planted import corrupt, planted, refused, write_cache

from extract import info
from extract.identity import buffer_sha256, identity_sha256
from federate.cache import _load, load_cache
from federate.errors import ConfigError


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    domains, text = planted({"a": 30, "b": 20}, classes=4, dim=24)
    good = write_cache(folder / "good.h5", domains, text)
    other = write_cache(folder / "other.h5", *planted({"a": 30, "b": 20}, classes=4, dim=24, seed=5))
    return good, other


def info_says(path, capsys, code, *match):
    assert info.main([str(path)]) == code
    out = capsys.readouterr()
    text = out.err if code == 2 else out.out
    assert all(m in text for m in match), text
    if code == 2:
        assert out.out == "" and text.count("\n") == 1, text
    return text


def set_attr(key, value):
    def edit(f):
        f.attrs[key] = value
        f.attrs["identity_sha256"] = identity_sha256(f.attrs)  # a consistent edit: only the type check can refuse
    return edit


def replace(name, data, **kw):
    def edit(f):
        del f[name]
        ds = f.create_dataset(name, data=data, **kw)
        ds.attrs["sha256"] = buffer_sha256(np.ascontiguousarray(ds[()]))
    return edit


# --- the file must hold its own data ---------------------------------------------------------------------

def external_link(other):
    def edit(f):
        del f["domains/b"]
        f["domains/b"] = h5py.ExternalLink(str(other), "/domains/b")
    return edit


def virtual_labels(other):
    def edit(f):
        sha = f["domains/b/labels"].attrs["sha256"]
        del f["domains/b/labels"]
        layout = h5py.VirtualLayout(shape=(20,), dtype=np.int64)
        layout[:] = h5py.VirtualSource(str(other), "domains/b/labels", shape=(20,))
        f.create_virtual_dataset("domains/b/labels", layout).attrs["sha256"] = sha
    return edit


def external_raw(outside):
    def edit(f):
        labels = f["domains/b/labels"][()]
        outside.write_bytes(labels.tobytes())  # another file holds the bytes: the checksum even matches
        del f["domains/b/labels"]
        ds = f.create_dataset("domains/b/labels", shape=(20,), dtype=np.int64, external=[(str(outside), 0, 160)])
        ds.attrs["sha256"] = buffer_sha256(labels)
    return edit


def soft_link(f):
    del f["domains/b/image_embeddings"]
    f["domains/b/image_embeddings"] = h5py.SoftLink("/domains/a/image_embeddings")


@pytest.mark.parametrize("kind", ["external link", "virtual dataset", "external file", "soft link"])
def test_a_cache_that_reads_other_files_is_refused(caches, tmp_path, capsys, kind):
    good, other = caches
    edit = {"external link": external_link(other), "virtual dataset": virtual_labels(other),
            "external file": external_raw(tmp_path / "outside.bin"), "soft link": soft_link}[kind]
    path = corrupt(good, tmp_path, edit)
    text = refused(path, "a cache must hold all its data itself")
    assert kind.split()[0] in text
    info_says(path, capsys, 2, "a cache must hold all its data itself")


def test_external_raw_storage_cannot_show_another_file_as_ids(caches, tmp_path, capsys):
    def passwd_as_ids(f):
        del f["domains/b/ids"]
        f.create_dataset("domains/b/ids", shape=(20,), dtype="S16", external=[("/etc/passwd", 0, 320)])
    path = corrupt(caches[0], tmp_path, passwd_as_ids)
    text = info_says(path, capsys, 2, "stored in the external file /etc/passwd")
    assert "root:" not in text and "/bin/" not in text
    refused(path, "/etc/passwd")


def test_links_to_a_fifo_or_a_fifo_never_hang(caches, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    path = corrupt(caches[0], tmp_path, lambda f: f.__setitem__("text/extra", h5py.ExternalLink(str(fifo), "/x")))
    code = ("import sys\nfrom federate.cache import load_cache\nfrom federate.errors import ConfigError\n"
            "for p in sys.argv[1:]:\n    try:\n        load_cache(p)\n    except ConfigError as e:\n        print(e)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, str(path), str(fifo)], env=env, capture_output=True,
                         text=True, timeout=60).stdout.splitlines()
    assert "an external link to" in out[0] and "is not a regular file" in out[1], out
    for target in (path, fifo):
        proc = subprocess.run([sys.executable, "-m", "extract.info", str(target)], env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr


# --- sizes are checked before reading ----------------------------------------------------------------------

def declare_huge(f, name="domains/b/labels", shape=(2 ** 40,), dtype=np.int64):
    sha = f[name].attrs.get("sha256")
    del f[name]
    f.create_dataset(name, shape=shape, dtype=dtype).attrs["sha256"] = sha  # declared, never stored


def test_a_small_file_declaring_huge_datasets_is_refused_before_reading(caches, tmp_path, capsys):
    path = corrupt(caches[0], tmp_path, declare_huge)
    assert path.stat().st_size < 100_000
    refused(path, "/domains/b/labels of shape [1099511627776], not [20]")
    info_says(path, capsys, 1, "/domains/b/labels of shape [1099511627776], not [20]")

    def all_huge(f):  # consistent shapes: only the stored size gives it away
        for name, shape, dtype in (("ids", (2 ** 40,), h5py.string_dtype()), ("labels", (2 ** 40,), np.int64),
                                   ("image_embeddings", (2 ** 40, 24), np.float32)):
            declare_huge(f, f"domains/b/{name}", shape, dtype)
    path = corrupt(caches[0], tmp_path, all_huge, "all.h5")
    refused(path, "declares /domains/b/ids of shape [1099511627776]", "stores only 0 bytes")
    info_says(path, capsys, 1, "declares /domains/b/ids of shape [1099511627776]")


@pytest.mark.parametrize("name, data, match", [
    ("domains/a/labels", np.zeros(30, np.float64), "/domains/a/labels of dtype float64, not int"),
    ("domains/a/image_embeddings", np.ones((30, 24), np.int32), "of dtype int32, not float"),
    ("text/logit_scale", np.ones(3, np.float32), "/text/logit_scale of shape [3], not a scalar"),
    ("text/embeddings", np.ones((1, 3, 24), np.float32), "/text/embeddings of shape [1, 3, 24], not [N, 4, 24]"),
])
def test_dtypes_and_shapes_are_checked(caches, tmp_path, capsys, name, data, match):
    path = corrupt(caches[0], tmp_path, replace(name, data))
    refused(path, match)
    info_says(path, capsys, 1, match)


def test_a_compressed_cache_is_still_read(caches, tmp_path):
    def compress(f):
        x = f["domains/a/image_embeddings"][()]
        replace("domains/a/image_embeddings", x, compression="gzip")(f)
    _load.cache_clear()
    assert load_cache(corrupt(caches[0], tmp_path, compress)).domains["a"].features.shape == (30, 24)


# --- attributes have their types, names stay inside their folder ------------------------------------------

@pytest.mark.parametrize("key, value, match", [
    ("schema_version", "1", "schema_version = '1', not an integer"),
    ("schema_version", 1.0, "schema_version = 1.0, not an integer"),
    ("schema_version", True, "schema_version = True, not an integer"),
    ("class_names", json.dumps("abcd"), "class_names = '\"abcd\"', not a JSON list of strings"),
    ("class_names", json.dumps({"a": 0, "b": 1, "c": 2, "d": 3}), "class_names = '{\"a\": 0"),
    ("class_names", json.dumps([0, 1, 2, 3]), "not a JSON list of strings"),
    ("class_names", json.dumps(["a", "b/c", "d", "e"]), "class 'b/c', which is not a plain name"),
    ("domains", json.dumps("ab"), "domains = '\"ab\"', not a JSON list of strings"),
    ("domains", json.dumps(["a", "../b"]), "domain '../b', which is not a plain name"),
    ("dataset_name", "../../x", "dataset_name '../../x', which is not a plain name"),
    ("dataset_name", "/tmp/x", "dataset_name '/tmp/x', which is not a plain name"),
    ("embed_dim", 0, "embed_dim = 0, not a positive integer"),
])
def test_mistyped_attributes_and_path_like_names_are_refused(caches, tmp_path, capsys, key, value, match):
    path = corrupt(caches[0], tmp_path, set_attr(key, value))
    refused(path, match)
    info_says(path, capsys, 1, match)


# --- vectors must be usable -------------------------------------------------------------------------------

def zero_row(f):
    x = f["domains/a/image_embeddings"][()]
    x[2] = 0
    replace("domains/a/image_embeddings", x)(f)


@pytest.mark.parametrize("edit, match", [
    (replace("text/logit_scale", np.float32(0)), "/text/logit_scale = 0.0, not a finite positive number"),
    (replace("text/logit_scale", np.float32(-100)), "/text/logit_scale = -100.0"),
    (replace("text/logit_scale", np.float32(np.inf)), "/text/logit_scale = inf"),
    (replace("text/logit_scale", np.float32(np.nan)), "/text/logit_scale = nan"),
    (replace("text/embeddings", np.zeros((1, 4, 24), np.float32)), "all-zero text embedding (template 0, class 0)"),
    (zero_row, "all-zero embedding (id 'a/00002')"),
])
def test_unusable_vectors_and_scales_are_refused(caches, tmp_path, capsys, edit, match):
    path = corrupt(caches[0], tmp_path, edit)
    refused(path, match)
    info_says(path, capsys, 1, match)


# --- an empty domain is an error, not an accuracy -------------------------------------------------------------

def test_an_empty_target_domain_is_an_error_naming_it(tmp_path):
    domains, text = planted({"alpha": 60, "beta": 60, "target": 0}, classes=3, dim=24)
    path = write_cache(tmp_path / "empty.h5", domains, text)
    refused(path, "domain target of", "has no images", "dataset.domains=[alpha,beta]", domains=("target",))
    _load.cache_clear()
    with pytest.raises(ConfigError, match="domain target of .* has no images"):
        run_federate(path, tmp_path / "out", rounds=1)
    assert not (tmp_path / "out" / "summary.json").exists()
    _load.cache_clear()
    assert list(load_cache(path, domains=("alpha",)).domains) == ["alpha"]  # not loaded, not refused
