"""Helpers shared by the benchmarks."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/planted.py writes synthetic caches in the real schema

PACS_SIZES = {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}


def pacs_sized_cache(path: Path) -> Path:
    """A planted cache with PACS's domain sizes, d = 512 and 7 classes (ViT-B/32 parameter count)."""
    from planted import planted, write_cache

    if not path.exists():
        domains, text = planted(PACS_SIZES, classes=7, dim=512, style_dims=64, noise=1.0)
        write_cache(path, domains, text, model_name="fedclip/planted", dataset_name="pacs_sized")
    return path


DOMAINNET_SIZES = {"clipart": 48_129, "infograph": 51_605, "painting": 72_266, "quickdraw": 172_500,
                   "real": 172_947, "sketch": 69_128}  # the cleaned release: 586,575 images


def domainnet_sized_cache(path: Path) -> Path:
    """A planted cache with DomainNet's domain sizes, d = 512 and 345 classes (1.2 GB of float32 embeddings)."""
    import numpy as np
    from planted import planted, write_cache

    if not path.exists():
        domains, text = planted(DOMAINNET_SIZES, classes=345, dim=512, style_dims=64, noise=1.0)
        domains = {k: (x.astype(np.float32), y) for k, (x, y) in domains.items()}
        write_cache(path, domains, text, model_name="fedclip/planted", dataset_name="domainnet_sized")
    return path


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory (MB) of this process, and the largest of its finished children (DataLoader
    workers, which share the parent's pages at fork)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return own / 1024, kids / 1024


def prepare(threads: int, cache_dir: Path | None, name: str) -> tuple[Path, Path]:
    """A benchmark's set-up: torch's threads (0: its default), flushed denormals (as federate runs), a fresh
    temporary folder and the folder that keeps the planted caches (`cache_dir`, or that temporary one)."""
    import tempfile

    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    tmp = Path(tempfile.mkdtemp(prefix=f"fedclip-{name}-bench-"))
    caches = cache_dir or tmp
    caches.mkdir(parents=True, exist_ok=True)
    return tmp, caches
