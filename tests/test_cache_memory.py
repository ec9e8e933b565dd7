"""Loading a cache keeps one copy of its embeddings (federate/cache.py): a float32 cache is used as read."""
from __future__ import annotations

import tracemalloc

import numpy as np
import torch
from planted import write_cache

from federate.cache import load_cache


def test_loading_a_float32_cache_makes_no_second_copy_of_its_embeddings(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40_000, 64)).astype(np.float32)  # 10 MB
    path = write_cache(tmp_path / "one.h5", {"only": (x, rng.integers(0, 3, len(x)))}, rng.normal(size=(3, 64)),
                       ids={"only": [str(i) for i in range(len(x))]})
    tracemalloc.start()
    try:
        cache = load_cache(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(cache.domains["only"].features, x)
    assert peak < 1.6 * x.nbytes, f"peak {peak / 1e6:.1f} MB for {x.nbytes / 1e6:.1f} MB of embeddings"


def test_domains_are_views_of_one_array_that_runs_index_without_copying(planted_cache, tmp_path):
    """The loader reads every domain into one array; a run's clients, pooled rows and target are indices into
    it (federate/rows.py), so a run holds the embeddings once (a DomainNet-sized cache: 1.2 GB, not 2.4)."""
    from conftest import config

    from federate import methods
    from federate.run import setup

    cache = load_cache(planted_cache)
    for d in cache.domains.values():
        assert np.shares_memory(d.features, cache.features) and np.shares_memory(d.labels, cache.labels)
        assert np.array_equal(cache.features[d.start:d.start + len(d.labels)], d.features)
    for method in ("fedclip", "central"):
        cfg = config("federate", [f"cache_file={planted_cache}", "model.name=fedclip/planted", "target_domain=target",
                                  f"method={method}", "partition=iid", "partition.clients_per_domain=2"])
        (tmp_path / method).mkdir()
        point = setup(cfg, methods.build(cfg.method), tmp_path / method, progress=False)
        point.federation.runlog.close()
        pools = {id(r.x) for c in point.clients for r in (c.train, c.val, c.test)}
        pools |= {id(point.target_set.x)} | {id(s.x) for s in point.train_sets}
        assert len(pools) == 1 and point.target_set.x.data_ptr() == cache.features.ctypes.data
        x, y = point.clients[0].val.gather()
        d = cache.domains[point.clients[0].domain]
        assert torch.equal(x, torch.from_numpy(d.features[point.clients[0].val.index.numpy() - d.start]))
