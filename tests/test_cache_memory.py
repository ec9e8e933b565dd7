"""Loading a cache keeps one copy of its embeddings (federate/cache.py): a float32 cache is used as read."""
from __future__ import annotations

import tracemalloc

import numpy as np
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
