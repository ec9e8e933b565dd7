"""Hostile dataset folders: symbolic links to folders are not followed unless asked, entries that are not
inputs (a file outside a class folder, a FIFO, a broken link) are recorded as skipped, and a file name that
is not valid UTF-8 is embedded under a lossless UTF-8 id."""
from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
from conftest import config, draw_shapes
from hydra.errors import ConfigCompositionException

from extract import pipeline
from federate.cache import _load, load_cache

NOT_UTF8 = b"caf\xe9.png"  # Latin-1, as a file copied from an old archive would be named


def extract(root, model, tmp, *extra):
    return pipeline.run(config("extract", ["dataset=folder", f"dataset.root={root}", f"model.name={model}",
                                           f"cache_file={tmp / 'c.h5'}", "num_workers=0", "batch_size=4", *extra]))


def contents(path):
    with h5py.File(path, "r") as f:
        return {d: {"ids": [s.decode() for s in f[f"domains/{d}/ids"][()]],
                    "emb": f[f"domains/{d}/image_embeddings"][()],
                    "skipped": dict(zip((s.decode() for s in f[f"domains/{d}/skipped/ids"][()]),
                                        (s.decode() for s in f[f"domains/{d}/skipped/reasons"][()])))}
                for d in json.loads(f.attrs["domains"])}, json.loads(f.attrs["class_names"])


@pytest.fixture
def root(tmp_path):
    return draw_shapes(tmp_path / "shapes", per_class=2, seed=3)


def test_a_symlinked_folder_is_not_followed_and_odd_entries_are_recorded(root, tiny_model, tmp_path):
    os.symlink("../photo", root / "sketch" / "dogloop")  # would copy photo's images into sketch
    os.symlink("../../photo/circle", root / "sketch" / "circle" / "more")
    os.mkfifo(root / "sketch" / "circle" / "pipe.png")  # opening it would block forever
    shutil.copy(root / "sketch" / "circle" / "0.png", root / "sketch" / "loose.png")  # outside a class folder
    os.symlink("missing.png", root / "photo" / "square" / "gone.png")
    cache, classes = contents(extract(root, tiny_model, tmp_path))
    assert classes == ["circle", "square"]
    assert all(i.startswith("sketch/") and "dogloop" not in i and "/more/" not in i for i in cache["sketch"]["ids"])
    assert len(cache["sketch"]["ids"]) == 4 and len(cache["photo"]["ids"]) == 4
    skipped = cache["sketch"]["skipped"]
    assert set(skipped) == {"sketch/dogloop", "sketch/circle/more", "sketch/circle/pipe.png", "sketch/loose.png"}
    assert "dataset.follow_symlinks=true" in skipped["sketch/dogloop"] and "FIFO" in skipped["sketch/circle/pipe.png"]
    assert "not inside a class folder" in skipped["sketch/loose.png"]
    assert cache["photo"]["skipped"] == {"photo/square/gone.png": "a broken symbolic link"}
    _load.cache_clear()
    assert len(load_cache(tmp_path / "c.h5").domains["sketch"].ids) == 4


def test_follow_symlinks_is_a_typed_setting_that_reads_through_links(root, tiny_model, tmp_path):
    os.symlink("../../photo/circle", root / "sketch" / "circle" / "more")
    os.symlink("..", root / "sketch" / "circle" / "loop")
    cache, _ = contents(extract(root, tiny_model, tmp_path, "dataset.follow_symlinks=true"))
    assert {"sketch/circle/more/0.png", "sketch/circle/more/1.png"} <= set(cache["sketch"]["ids"])
    assert "a loop" in cache["sketch"]["skipped"]["sketch/circle/loop"]
    with pytest.raises(ConfigCompositionException):
        config("extract", ["dataset=folder", f"dataset.root={root}", "dataset.follow_symlinks=maybe"])


def test_a_file_name_that_is_not_utf8_is_embedded_under_a_lossless_id(root, tiny_model, tmp_path):
    folder = os.fsencode(root / "photo" / "circle")
    shutil.copy(root / "photo" / "circle" / "0.png", os.path.join(folder, NOT_UTF8))
    cache, _ = contents(extract(root, tiny_model, tmp_path))
    ids = cache["photo"]["ids"]
    assert "photo/circle/caf\\xe9.png" in ids  # the undecodable byte written as \xe9
    row = ids.index("photo/circle/caf\\xe9.png")
    np.testing.assert_allclose(cache["photo"]["emb"][row], cache["photo"]["emb"][ids.index("photo/circle/0.png")],
                               rtol=1e-5, atol=1e-6)  # the same picture: the file itself was read
    assert ids[row].encode("ascii").decode("unicode_escape").encode("latin-1") == b"photo/circle/" + NOT_UTF8
    assert extract(root, tiny_model, tmp_path) == tmp_path / "c.h5"  # a re-run finds it complete


def test_a_dataset_name_that_leads_outside_the_cache_folder_is_refused(root, tiny_model, tmp_path):
    from extract.errors import ExtractError

    cfg = config("extract", ["dataset=folder", f"dataset.root={root}", "dataset.name=../../x",
                             f"model.name={tiny_model}", f"cache_dir={tmp_path / 'a' / 'b'}"])
    with pytest.raises(ExtractError, match=r"dataset name '../../x', which is not a plain name.*dataset.name=x"):
        pipeline.run(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # nothing written, inside or outside
