"""Sharing a cache through the Hugging Face Hub (extract/hub/): export -> load_dataset -> import gives the
same cache bit for bit (float32 and float16), hostile folders are refused in one line naming the file, pull
and push are tested up to the network with huggingface_hub's calls served from a local folder, offline
fails in seconds, and `federate cache_file=hf://...` runs on the pulled copy."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from conftest import config, draw_shapes, outputs, run_cli, run_federate
from planted import one_line, planted, write_cache

from extract import pipeline
from extract.errors import ExtractError
from extract.hub import remote
from extract.hub.export import export
from extract.hub.rebuild import import_folder

refused = partial(one_line, ExtractError)
SHA = "0123456789abcdef0123456789abcdef01234567"


# --- caches --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_caches(tmp_path_factory, tiny_model):
    """Two caches written by extract (float32 and float16) over a folder with files it skips."""
    tmp = tmp_path_factory.mktemp("hub_real")
    root = draw_shapes(tmp / "shapes", per_class=3, seed=1)
    (root / "photo" / "circle" / "notes.txt").write_text("not an image")
    (root / "sketch" / "stray.png").write_bytes(b"beside the class folders")
    out = {}
    for dtype in ("float32", "float16"):
        out[dtype] = pipeline.run(config("extract", [
            "dataset=folder", f"dataset.root={root}", f"model.name={tiny_model}", f"cache_file={tmp / dtype}.h5",
            "num_workers=0", "batch_size=4", f"cache_dtype={dtype}"]))
    return out


def small_cache(path, sizes=None, seed=0, **kw) -> Path:
    domains, text = planted(sizes or {"a": 30, "b": 20}, classes=3, dim=8, style_dims=4, seed=seed)
    return write_cache(path, domains, text, **kw)


def objects(path) -> dict:
    """Every group and dataset of an HDF5 file: attributes with their HDF5 types, dtype, shape, raw bytes."""
    out = {}
    with h5py.File(path, "r") as f:
        def attrs(obj):
            return {k: (obj.attrs[k], str(obj.attrs.get_id(k).dtype), h5py.check_string_dtype(obj.attrs.get_id(k).dtype))
                    for k in obj.attrs}

        def visit(name, obj):
            entry = {"attrs": attrs(obj)}
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                entry.update(dtype=str(obj.dtype), strings=h5py.check_string_dtype(obj.dtype), shape=obj.shape,
                             data=list(np.atleast_1d(data)) if data.dtype.kind == "O" else np.asarray(data).tobytes())
            out[name] = entry
        out["/"] = {"attrs": attrs(f)}
        f.visititems(visit)
    return out


def assert_same_cache(a, b) -> None:
    """Every group, dataset, array (bit for bit) and attribute (value and HDF5 type) is the same."""
    x, y = objects(a), objects(b)
    assert x.keys() == y.keys()
    for name in x:
        ax, ay = x[name]["attrs"], y[name]["attrs"]
        assert ax.keys() == ay.keys(), name
        for k in ax:
            assert ax[k][1:] == ay[k][1:] and np.array_equal(ax[k][0], ay[k][0]) and type(ax[k][0]) is type(ay[k][0]), \
                (name, k)
        assert {k: v for k, v in x[name].items() if k != "attrs"} == {k: v for k, v in y[name].items() if k != "attrs"}, name


def exported(cache, tmp_path, name="export") -> Path:
    folder = tmp_path / name
    export(cache, folder)
    return folder


# --- the round trip -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_export_load_dataset_import_gives_the_same_cache(real_caches, dtype, tmp_path):
    import datasets
    from datasets import ClassLabel, Features, List, Value
    from huggingface_hub import DatasetCard

    from federate.cache import load_cache

    cache = real_caches[dtype]
    folder = exported(cache, tmp_path)
    with h5py.File(cache, "r") as f:
        classes = json.loads(f.attrs["class_names"])
        domains = json.loads(f.attrs["domains"])
        rows = {d: (f[f"domains/{d}/ids"].asstr()[()], f[f"domains/{d}/labels"][()],
                    f[f"domains/{d}/image_embeddings"][()]) for d in domains}
        text = f["text/embeddings"][()]
        assert len(f["domains/photo/skipped/ids"]) == 1 and len(f["domains/sketch/skipped/ids"]) == 1

    card = DatasetCard.load(folder / "README.md")  # the card's YAML, read back by huggingface_hub
    data = card.data.to_dict()
    assert [c["config_name"] for c in data["configs"]] == ["images", "prompts"]
    infos = {i["config_name"]: Features._from_yaml_list(i["features"]) for i in data["dataset_info"]}
    assert infos["images"] == Features({"id": Value("string"), "label": ClassLabel(names=classes),
                                        "domain": Value("string"), "embedding": List(Value(dtype), length=32)})
    assert data["fedclip"]["cache"]["identity_sha256"] == load_cache(cache).identity_sha256

    images = datasets.load_dataset(str(folder), "images", split="train", cache_dir=str(tmp_path / "hf"))
    assert images.features == infos["images"]
    images = images.with_format("numpy")
    assert list(images["domain"]) == [d for d in domains for _ in rows[d][0]]
    assert list(images["id"]) == [i for d in domains for i in rows[d][0]]
    assert np.array_equal(images["label"], np.concatenate([rows[d][1] for d in domains]))
    stored = images.with_format("arrow")["embedding"].combine_chunks().flatten().to_numpy()  # numpy format upcasts float16
    assert stored.dtype == np.dtype(dtype) and stored.tobytes() == np.concatenate([rows[d][2] for d in domains]).tobytes()
    prompts = datasets.load_dataset(str(folder), "prompts", split="train", cache_dir=str(tmp_path / "hf"))
    assert prompts.features["label"].names == classes and prompts[1]["prompt"] == "a picture of a square"
    assert np.asarray(prompts.with_format("numpy")["embedding"]).tobytes() == text.reshape(-1, 32).tobytes()

    back = import_folder(folder, tmp_path / "back.h5")
    assert not back.reused
    assert_same_cache(cache, back.path)
    a, b = load_cache(cache), load_cache(back.path)  # federate's loader accepts it as the same cache
    assert a.identity_sha256 == b.identity_sha256 and a.checksums == b.checksums


def test_special_float_values_survive_bit_for_bit(tmp_path):
    """-0.0, subnormals, the largest float16 and float32 values: the exact bits come back (a Parquet
    dictionary or a conversion would merge -0.0 into 0.0)."""
    from extract.identity import buffer_sha256, identity_sha256

    for dtype in ("float32", "float16"):
        domains, text = planted({"a": 40, "b": 40}, classes=3, dim=8, style_dims=4)
        path = write_cache(tmp_path / f"{dtype}.h5", domains, text)
        info = np.finfo(dtype)
        with h5py.File(path, "a") as f:
            for d, (x, _) in domains.items():
                x = x.astype(dtype)
                if d == "a":
                    x[0, :4] = [-0.0, info.smallest_subnormal, -info.smallest_subnormal, info.max]
                    x[1, :2] = [info.min, -0.0]
                del f[f"domains/{d}/image_embeddings"]
                f[f"domains/{d}/image_embeddings"] = x
                f[f"domains/{d}/image_embeddings"].attrs["sha256"] = buffer_sha256(x)
            f.attrs["image_dtype"] = dtype
            f.attrs["identity_sha256"] = identity_sha256(f.attrs)
        back = import_folder(exported(path, tmp_path, f"e-{dtype}"), tmp_path / f"back-{dtype}.h5")
        assert_same_cache(path, back.path)
        with h5py.File(back.path, "r") as f:
            assert np.signbit(f["domains/a/image_embeddings"][0, 0]) and f["domains/a/image_embeddings"].dtype == dtype


def test_runs_on_the_original_and_the_imported_cache_are_identical(planted_cache, tmp_path):
    from federate.report import table_sets

    back = import_folder(exported(planted_cache, tmp_path), tmp_path / "back.h5").path
    run_federate(planted_cache, tmp_path / "a", rounds=3)
    run_federate(back, tmp_path / "b", rounds=3)
    a, b = outputs(tmp_path / "a"), outputs(tmp_path / "b")
    assert a[0].pop("config")["cache_file"] != b[0].pop("config")["cache_file"]
    assert a[0] == b[0] and a[1] == b[1] and all(np.array_equal(a[2][k], b[2][k]) for k in a[2])
    assert a[0]["cache_identity_sha256"] == b[0]["cache_identity_sha256"] and a[0]["cache_checksums"]
    runs = [{**json.loads((tmp_path / run / "summary.json").read_text()), "_dir": tmp_path / run} for run in "ab"]
    assert len(table_sets(runs)) == 1  # the report groups them as one cache


def test_the_card_names_the_source_datasets_citation_and_license(tmp_path):
    from huggingface_hub import DatasetCard

    cache = small_cache(tmp_path / "c.h5", dataset_name="pacs")
    export(cache, tmp_path / "out")
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "unknown" and "Deeper, Broader and Artier Domain Generalization" in card.text
    assert "fedclip" in card.data.tags and card.data.pretty_name == "pacs CLIP embeddings (fedclip/planted)"
    export(cache, tmp_path / "out", license="cc-by-4.0", repo_id="lab/pacs-emb")
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "cc-by-4.0" and 'load_dataset("lab/pacs-emb", "images", split="train")' in card.text


def test_a_large_domain_is_split_into_files_and_rebuilt_in_order(tmp_path, monkeypatch):
    from extract.hub import layout

    monkeypatch.setattr(layout, "SHARD_VALUES", 8 * 7)  # 7 rows of 8 values a file
    monkeypatch.setattr("extract.hub.rebuild.BLOCK_ROWS", 3)  # Parquet read in blocks across file ends
    cache = small_cache(tmp_path / "c.h5")
    folder = exported(cache, tmp_path)
    assert len(list((folder / "data/images/a").glob("*.parquet"))) == 5  # 30 rows
    assert_same_cache(cache, import_folder(folder, tmp_path / "back.h5").path)


def test_domain_names_that_are_not_plain_file_names_round_trip(tmp_path):
    """A domain folder is the domain's name, percent-encoded where `datasets` or a path would read it
    otherwise (a leading '_' or '.', spaces, '%', non-ASCII)."""
    import datasets

    from extract.hub.layout import domain_folder

    names = ["_private", ".dot", "Real World é", "100%"]
    assert [domain_folder(n) for n in names] == ["%5Fprivate", "%2Edot", "Real%20World%20%C3%A9", "100%25"]
    cache = small_cache(tmp_path / "c.h5", sizes={n: 6 + k for k, n in enumerate(names)})
    folder = exported(cache, tmp_path)
    images = datasets.load_dataset(str(folder), "images", split="train", cache_dir=str(tmp_path / "hf"))
    assert list(images["domain"]) == [n for k, n in enumerate(names) for _ in range(6 + k)]
    assert_same_cache(cache, import_folder(folder, tmp_path / "back.h5").path)


# --- hostile folders -------------------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    return exported(small_cache(tmp_path / "c.h5"), tmp_path)


def first_file(folder: Path) -> Path:
    return folder / "data/images/a/part-00000.parquet"


def edit_card(folder: Path, edit) -> None:
    """Change the card's YAML (a dict) with `edit` and write it back."""
    from huggingface_hub import DatasetCard, DatasetCardData

    card = DatasetCard.load(folder / "README.md")
    data = card.data.to_dict()
    edit(data)
    card.data = DatasetCardData(**data)
    (folder / "README.md").write_text(str(card))


def test_a_tampered_file_is_refused_naming_it(folder, tmp_path):
    raw = bytearray(first_file(folder).read_bytes())
    raw[len(raw) // 2] ^= 1
    first_file(folder).write_bytes(bytes(raw))
    refused(lambda: import_folder(folder, tmp_path / "x.h5"), str(first_file(folder)), "sha256")
    assert not (tmp_path / "x.h5").exists()


def test_a_truncated_file_is_refused_naming_it(folder, tmp_path):
    raw = first_file(folder).read_bytes()
    first_file(folder).write_bytes(raw[: len(raw) // 2])
    refused(lambda: import_folder(folder, tmp_path / "x.h5"), str(first_file(folder)), "truncated")


def test_a_missing_file_is_refused_naming_it(folder, tmp_path):
    first_file(folder).unlink()
    refused(lambda: import_folder(folder, tmp_path / "x.h5"), str(first_file(folder)), "missing")


def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(folder, tmp_path):
    import os

    first_file(folder).unlink()
    os.mkfifo(first_file(folder))
    refused(lambda: import_folder(folder, tmp_path / "x.h5"), str(first_file(folder)), "not a regular file")


@pytest.mark.parametrize("extra", ["data/images/a/part-00001.parquet", "notes.txt"])
def test_an_unexpected_file_is_refused_naming_it(folder, tmp_path, extra):
    (folder / extra).write_bytes(b"x")
    refused(lambda: import_folder(folder, tmp_path / "x.h5"), str(folder / extra), "not listed")


def test_what_the_hub_adds_is_allowed(folder, tmp_path):
    (folder / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    (folder / ".cache/huggingface/download").mkdir(parents=True)
    (folder / ".cache/huggingface/download/x.metadata").write_text("abc")
    assert not import_folder(folder, tmp_path / "x.h5").reused


def test_a_card_without_provenance_is_refused(folder, tmp_path):
    edit_card(folder, lambda d: d.pop("fedclip"))
    refused(lambda: import_folder(folder, tmp_path / "x.h5"), str(folder / "README.md"), "no fedclip provenance")
    (folder / "README.md").write_text("# just a title\n")
    refused(lambda: import_folder(folder, tmp_path / "x.h5"), str(folder / "README.md"), "no YAML block")
    (folder / "README.md").unlink()
    refused(lambda: import_folder(folder, tmp_path / "x.h5"), str(folder / "README.md"), "is missing")


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["fedclip"]["files"]["data/images/a/part-00000.parquet"].update(rows="thirty"),
     "fedclip.files['data/images/a/part-00000.parquet'].rows is 'thirty', not an integer"),
    (lambda d: d["fedclip"]["cache"].pop("identity_sha256"), "fedclip.cache.identity_sha256 is missing"),
    (lambda d: d["fedclip"]["cache"]["datasets"]["/domains/a/labels"].update(shape=[31]),
     "'/domains/a/labels'].shape is [31], not [30]"),
    (lambda d: d["fedclip"]["cache"]["groups"]["/"][4].update(value="8"), "not an integer of type int64"),
    (lambda d: d["fedclip"].update(complete=False), "did not finish"),
    (lambda d: next(a for a in d["fedclip"]["cache"]["groups"]["/"] if a["name"] == "model_name").update(value="x"),
     "an attribute was changed"),
    (lambda d: d["fedclip"]["files"]["data/images/a/part-00000.parquet"].update(rows=31), "hold 31 rows"),
    (lambda d: d["configs"][0]["data_files"][0].update(path=["data/images/b/part-00000.parquet"]),
     "declares configs"),
])
def test_a_card_with_damaged_provenance_is_refused(folder, tmp_path, edit, match):
    edit_card(folder, edit)
    refused(lambda: import_folder(folder, tmp_path / "x.h5"), str(folder / "README.md"), match)


def test_a_card_claiming_other_shapes_is_refused_naming_the_file(folder, tmp_path):
    """A card edited consistently to say the embeddings have 16 dimensions: the Parquet file says 8."""
    from extract.identity import identity_sha256
    from extract.hub.layout import decode_attr

    def sixteen(d):
        cache = d["fedclip"]["cache"]
        root = cache["groups"]["/"]
        next(a for a in root if a["name"] == "embed_dim")["value"] = 16
        ident = identity_sha256({a["name"]: decode_attr(a) for a in root})
        next(a for a in root if a["name"] == "identity_sha256")["value"] = ident
        cache["identity_sha256"] = ident
        for path, entry in cache["datasets"].items():
            if entry["shape"] and entry["shape"][-1] == 8:
                entry["shape"][-1] = 16
        for info in d["dataset_info"]:
            next(f for f in info["features"] if f["name"] == "embedding")["length"] = 16

    edit_card(folder, sixteen)
    refused(lambda: import_folder(folder, tmp_path / "x.h5"), str(first_file(folder)),
            "fixed_size_list<element: float>[8]", "[16]")


def test_a_card_whose_checksums_the_files_do_not_rebuild_is_refused(folder, tmp_path):
    edit_card(folder, lambda d: d["fedclip"]["cache"]["datasets"]["/domains/b/labels"]["attributes"][0].update(
        value="0" * 64))
    refused(lambda: import_folder(folder, tmp_path / "x.h5"), "/domains/b/labels", "do not rebuild")
    assert not (tmp_path / "x.h5").exists() and not list(tmp_path.glob(".x.h5.*"))


# --- what the tool did not create --------------------------------------------------------------------------------

def test_export_refuses_a_folder_it_did_not_write(tmp_path):
    cache = small_cache(tmp_path / "c.h5")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep")
    refused(lambda: export(cache, tmp_path / "mine"), "not written by python -m extract.hub export")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep" and len(list((tmp_path / "mine").iterdir())) == 1
    folder = exported(cache, tmp_path)
    (folder / "thesis.tex").write_text("keep")
    refused(lambda: export(cache, folder), str(folder / "thesis.tex"), "did not write")
    (folder / "thesis.tex").unlink()
    (tmp_path / "elsewhere").mkdir()
    (folder / "data" / "images" / "a" / "part-00000.parquet").unlink()
    (folder / "data" / "images" / "a" / "part-00000.parquet").symlink_to(tmp_path / "elsewhere" / "x")
    refused(lambda: export(cache, folder), "did not write")


def test_export_again_replaces_its_own_files_and_removes_stale_ones(tmp_path):
    folder = exported(small_cache(tmp_path / "c.h5"), tmp_path)
    (folder / ".gitattributes").write_text("kept\n")
    other = small_cache(tmp_path / "d.h5", sizes={"b": 20, "c": 10}, seed=1)
    export(other, folder)
    assert not (folder / "data/images/a").exists() and (folder / "data/images/c/part-00000.parquet").is_file()
    assert (folder / ".gitattributes").read_text() == "kept\n"
    assert_same_cache(other, import_folder(folder, tmp_path / "back.h5").path)


def test_an_interrupted_export_is_finished_by_running_it_again(tmp_path, monkeypatch):
    from extract.hub import export as exporter

    cache = small_cache(tmp_path / "c.h5")
    real, calls = exporter.write_parquet, []

    def dies_on_the_second_file(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(exporter, "write_parquet", dies_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        export(cache, tmp_path / "out")
    refused(lambda: import_folder(tmp_path / "out", tmp_path / "x.h5"), "did not finish")
    monkeypatch.setattr(exporter, "write_parquet", real)
    export(cache, tmp_path / "out")
    assert_same_cache(cache, import_folder(tmp_path / "out", tmp_path / "back.h5").path)


def test_a_damaged_cache_is_not_exported(tmp_path):
    cache = small_cache(tmp_path / "c.h5")
    with h5py.File(cache, "a") as f:
        f["domains/b/image_embeddings"][3, 2] += 1
    refused(lambda: export(cache, tmp_path / "out"), "checksum mismatch in /domains/b/image_embeddings")
    refused(lambda: import_folder(tmp_path / "out", tmp_path / "x.h5"), "did not finish")
    refused(lambda: export(tmp_path / "nope.h5", tmp_path / "out2"), "does not exist")


def test_import_never_overwrites_what_it_did_not_write(folder, tmp_path):
    target = tmp_path / "x.h5"
    target.write_text("my notes")
    refused(lambda: import_folder(folder, target), "is not a fedclip cache", "does not overwrite")
    refused(lambda: import_folder(folder, target, overwrite=True), "is not a fedclip cache")
    assert target.read_text() == "my notes"
    other = small_cache(tmp_path / "other.h5", seed=5, dataset_name="other")
    refused(lambda: import_folder(folder, other), "another identity", "overwrite=true")
    assert import_folder(folder, other, overwrite=True).reused is False
    assert import_folder(folder, other).reused is True  # the same cache: kept as it is
    link = tmp_path / "link.h5"
    link.symlink_to(other)
    refused(lambda: import_folder(folder, link), "is not a fedclip cache")


# --- pull and push, served from local folders -----------------------------------------------------------------

class FakeHub:
    """huggingface_hub's calls answered from folders laid out as its cache (datasets--owner--name/snapshots/<commit>/),
    so resolution, download, verification and the rebuild run without the network."""

    def __init__(self, root: Path, monkeypatch):
        import huggingface_hub
        from huggingface_hub import HfApi, constants

        self.root, self.refs, self.calls, self.private = root, {}, [], {}
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(remote, "hub_reachable", lambda timeout=3.0: True)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        for name in ("repo_info", "list_repo_tree", "create_repo", "upload_folder", "create_tag"):
            monkeypatch.setattr(HfApi, name, getattr(self, name))

    def storage(self, repo_id: str) -> Path:
        return self.root / f"datasets--{repo_id.replace('/', '--')}"

    def publish(self, folder: Path, repo_id: str, branch="main") -> str:
        commit = hashlib.sha1(f"{repo_id}{len(self.calls)}{time.time()}".encode()).hexdigest()
        snapshot = self.storage(repo_id) / "snapshots" / commit
        shutil.copytree(folder, snapshot)
        (snapshot / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
        self.tree = {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}
        self.refs.setdefault(repo_id, {})[branch] = commit
        return commit

    def resolve(self, repo_id, revision):
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        if repo_id not in self.refs:
            raise RepositoryNotFoundError("404", response=SimpleNamespace(status_code=404, headers={}, request=None))
        if revision in self.refs[repo_id].values():
            return revision
        if revision not in self.refs[repo_id]:
            raise RevisionNotFoundError("404", response=SimpleNamespace(status_code=404, headers={}, request=None))
        return self.refs[repo_id][revision]

    def repo_info(self, repo_id, *, repo_type=None, revision=None, timeout=None, **kw):
        assert repo_type == "dataset"
        self.calls.append(("repo_info", repo_id, revision))
        empty = revision is None and not self.refs.get(repo_id, {"main": 1})  # a new repo without commits
        return SimpleNamespace(sha=None if empty else self.resolve(repo_id, revision or "main"),
                               private=self.private.get(repo_id, False))

    def snapshot_download(self, repo_id, *, repo_type=None, revision=None, local_files_only=False, **kw):
        assert repo_type == "dataset" and not local_files_only
        self.calls.append(("snapshot_download", repo_id, revision))
        return str(self.storage(repo_id) / "snapshots" / self.resolve(repo_id, revision))

    def list_repo_tree(self, repo_id, *, recursive=False, revision=None, repo_type=None, **kw):
        from huggingface_hub.hf_api import RepoFile
        from huggingface_hub.utils.sha import git_hash

        for path, data in self.tree.items():  # what the hub recorded when the commit was made
            lfs = {"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 130} \
                if path.endswith(".parquet") else None
            yield RepoFile(path=path, size=len(data), oid=git_hash(data), lfs=lfs)

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **kw):
        self.calls.append(("create_repo", repo_id, private))
        self.private.setdefault(repo_id, bool(private))
        self.refs.setdefault(repo_id, {})
        return f"https://huggingface.co/datasets/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None, delete_patterns=None, **kw):
        assert delete_patterns == "*" and repo_type == "dataset"
        self.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).rglob("*.parquet"))))
        return SimpleNamespace(oid=self.publish(Path(folder_path), repo_id))

    def create_tag(self, repo_id, *, tag, revision=None, repo_type=None, **kw):
        self.refs[repo_id][tag] = revision


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return FakeHub(tmp_path / "hf", monkeypatch)


def test_pull_resolves_a_branch_to_its_commit_verifies_and_rebuilds(hub, tmp_path):
    cache = small_cache(tmp_path / "c.h5")
    commit = hub.publish(exported(cache, tmp_path), "lab/pacs-emb")
    pulled = remote.pull("lab/pacs-emb@main", cache_dir=tmp_path / "cache")
    assert pulled.commit == commit and pulled.path == tmp_path / "cache" / "hub" / f"lab--pacs-emb--{commit}.h5"
    assert ("snapshot_download", "lab/pacs-emb", commit) in hub.calls  # the commit, not the moving branch
    assert_same_cache(cache, pulled.path)
    hub.calls.clear()
    again = remote.pull(f"lab/pacs-emb@{commit}", cache_dir=tmp_path / "cache")
    assert again.reused and hub.calls == []  # a commit with a local copy: no network at all


def test_pull_refuses_a_download_that_differs_from_the_hubs_checksums(hub, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    commit = hub.publish(exported(small_cache(tmp_path / "c.h5"), tmp_path), "lab/x")
    bad = hub.storage("lab/x") / "snapshots" / commit / "data/images/b/part-00000.parquet"
    raw = bytearray(bad.read_bytes())
    raw[100] ^= 1
    bad.write_bytes(bytes(raw))
    refused(lambda: remote.pull("lab/x", cache_dir=tmp_path / "cache"), str(bad), "the hub's sha256 checksum")
    monkeypatch.delattr(HfApi, "verify_repo_checksums")  # an older huggingface_hub: the card's sha256 catch it
    refused(lambda: remote.pull("lab/x", cache_dir=tmp_path / "cache"), str(bad), "sha256 its card records")
    assert not list((tmp_path / "cache" / "hub").glob("*.h5"))


def test_pull_names_a_missing_repo_or_revision(hub, tmp_path):
    hub.publish(exported(small_cache(tmp_path / "c.h5"), tmp_path), "lab/x")
    refused(lambda: remote.pull("lab/y", cache_dir=tmp_path), "lab/y does not exist")
    refused(lambda: remote.pull("lab/x@v9", cache_dir=tmp_path), "has no revision 'v9'")


def test_pull_into_a_given_file_never_replaces_a_foreign_one(hub, tmp_path):
    cache = small_cache(tmp_path / "c.h5")
    commit = hub.publish(exported(cache, tmp_path), "lab/x")
    mine = tmp_path / "mine.h5"
    mine.write_text("my notes")
    refused(lambda: remote.pull("lab/x", cache_file=mine), str(mine), "is not a fedclip cache")
    assert mine.read_text() == "my notes"
    pulled = remote.pull(f"lab/x@{commit}", cache_dir=tmp_path / "cache", cache_file=tmp_path / "there.h5")
    assert pulled.path == tmp_path / "there.h5" and not (tmp_path / "cache").exists()
    assert_same_cache(cache, pulled.path)


def test_references_are_checked_before_any_request(hub, tmp_path):
    for ref in ("lab", "lab/x@", "lab/x@a b", "a--b/c", "../x/y", "lab/x@v1@v2"):
        refused(lambda: remote.pull(ref, cache_dir=tmp_path), repr(ref), "not a hub dataset reference")
    assert hub.calls == []
    assert remote.parse_ref("hf://datasets/lab/x@refs/pr/1") == ("lab/x", "refs/pr/1")


def test_push_then_pull_by_tag_gives_the_same_cache(hub, tmp_path, capsys):
    from extract.hub.__main__ import main

    cache = small_cache(tmp_path / "c.h5")
    assert main(["push", str(cache), "lab/emb", "private=true", "tag=v1"]) == 0
    out = capsys.readouterr().out
    commit = hub.refs["lab/emb"]["v1"]
    assert f"commit {commit}" in out and f"python -m extract.hub pull lab/emb@{commit}" in out
    assert f"python -m federate cache_file=hf://lab/emb@{commit} model.name=fedclip/planted" in out
    assert ("create_repo", "lab/emb", True) in hub.calls
    assert not list(tmp_path.glob(".hub-push-*"))  # the exported folder is removed after the upload
    pulled = remote.pull("lab/emb@v1", cache_dir=tmp_path / "cache")
    assert pulled.commit == commit
    assert_same_cache(cache, pulled.path)


def test_push_private_to_an_existing_public_repo_is_refused(hub, tmp_path):
    hub.private["lab/open"] = False
    hub.refs["lab/open"] = {}
    refused(lambda: remote.push(small_cache(tmp_path / "c.h5"), "lab/open", private=True), "is public")
    assert not any(c[0] == "upload_folder" for c in hub.calls)


def test_offline_pull_uses_the_local_hf_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with a cached snapshot: huggingface_hub's own offline code resolves the branch."""
    from huggingface_hub import constants

    cache = small_cache(tmp_path / "c.h5")
    folder = exported(cache, tmp_path)
    storage = tmp_path / "hf" / "datasets--lab--x"
    shutil.copytree(folder, storage / "snapshots" / SHA)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(SHA)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pulled = remote.pull("lab/x@main", cache_dir=tmp_path / "cache")
    assert pulled.commit == SHA
    assert_same_cache(cache, pulled.path)


def test_offline_pull_fails_in_seconds_with_the_command_to_use_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    start = time.perf_counter()
    proc = run_cli("extract.hub", "pull", "lab/x@main", f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path, timeout=60)
    took = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout
    assert "HF_HUB_OFFLINE=1 is set" in lines[0]
    assert f"python -m extract.hub import /path/to/folder {tmp_path / 'cache' / 'hub' / 'lab--x--main.h5'}" in lines[0]
    assert took < 15, took  # the interpreter and imports included


# --- federate cache_file=hf://... ----------------------------------------------------------------------------------

def test_federate_runs_on_a_pulled_revision_and_records_it(planted_cache, hub, tmp_path):
    commit = hub.publish(exported(planted_cache, tmp_path), "lab/planted")
    remote._local_cache.cache_clear()
    summary = run_federate("hf://lab/planted@main", tmp_path / "run", f"cache_dir={tmp_path / 'cache'}", rounds=2)
    assert summary["cache_hub"] == {"repo_id": "lab/planted", "revision": "main", "commit": commit}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["cache_hub"]["commit"] == commit
    original = run_federate(planted_cache, tmp_path / "orig", rounds=2)
    assert summary["cache_identity_sha256"] == original["cache_identity_sha256"]
    assert summary["generalization"] == original["generalization"] and summary["overall"] == original["overall"]


@pytest.mark.slow
def test_federate_reuses_the_local_copy_of_a_commit_offline(planted_cache, tmp_path, monkeypatch):
    commit = SHA
    import_folder(exported(planted_cache, tmp_path), tmp_path / "cache" / "hub" / f"lab--planted--{commit}.h5")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    proc = run_cli("federate", f"cache_file=hf://lab/planted@{commit}", f"cache_dir={tmp_path / 'cache'}",
                   "model.name=fedclip/planted", "target_domain=target", "rounds=2", f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["cache_hub"] == {"repo_id": "lab/planted", "revision": commit, "commit": commit}
    proc = run_cli("federate", "cache_file=hf://lab/planted@main", f"cache_dir={tmp_path / 'cache'}",
                   "model.name=fedclip/planted", "target_domain=target", f"hydra.run.dir={tmp_path / 'run2'}", cwd=tmp_path)
    errors = [line for line in proc.stdout.splitlines() if "ERROR" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout
    assert f"hf://lab/planted@{commit}" in errors[0] and "python -m extract.hub import" in errors[0]


def test_a_damaged_local_copy_asks_for_a_fresh_pull(planted_cache, tmp_path):
    from federate.errors import ConfigError

    copy = import_folder(exported(planted_cache, tmp_path), tmp_path / "cache" / "hub" / f"lab--planted--{SHA}.h5")
    with h5py.File(copy.path, "a") as f:
        f["domains/beta/image_embeddings"][0, 0] += 1
    remote._local_cache.cache_clear()
    one_line(ConfigError, lambda: run_federate(f"hf://lab/planted@{SHA}", tmp_path / "run", f"cache_dir={tmp_path / 'cache'}"),
             "checksum mismatch in /domains/beta/image_embeddings",
             f"python -m extract.hub pull lab/planted@{SHA} cache_dir={tmp_path / 'cache'} overwrite=true")


# --- the command line ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_export_and_import(tmp_path):
    cache = small_cache(tmp_path / "c.h5")
    proc = run_cli("extract.hub", "export", str(cache), str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0 and "load_dataset" in proc.stdout, proc.stdout
    proc = run_cli("extract.hub", "import", str(tmp_path / "out"), str(tmp_path / "back.h5"), cwd=tmp_path)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stdout
    assert_same_cache(cache, tmp_path / "back.h5")
    proc = run_cli("extract.hub", "import", str(tmp_path / "out"), str(cache), "overwrite=maybe", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout.strip() == "error: overwrite must be true or false, not 'maybe'"
    (tmp_path / "out" / "data/prompts/part-00000.parquet").unlink()
    proc = run_cli("extract.hub", "import", str(tmp_path / "out"), str(tmp_path / "x.h5"), cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stdout.strip().splitlines()) == 1 and "part-00000.parquet is missing" \
        in proc.stdout
