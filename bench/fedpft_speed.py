"""Is one-shot FedPFT on a DomainNet-sized cache faster, end to end, than one round of FedCLIP on it?
Whole `python -m federate` processes (set-up included: the cache read, the clients made, the rounds, the
outputs written), interleaved, best of --repeats; the goal: FedPFT (one spherical component) in less time
than FedCLIP with rounds=1.

    python bench/fedpft_speed.py [--repeats 1] [--threads N] [--cache-dir DIR] [--scale 1.0]
        [--variant "method.samples_per_class=100" ...]

DomainNet-sized planted cache (586,575 x 512, 345 classes, 6 domains, 1.2 GB; --scale < 1 shrinks every
domain), target clipart, partition=dirichlet partition.clients_per_domain=5 partition.alpha=0.5 (25
clients). FedPFT runs with the Flower baseline's recipe (its config: 50 head epochs over as many synthetic
embeddings as real ones) and with each --variant's overrides; its log lines say where the time went.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DOMAINNET_SIZES, ROOT

PARTITION = ["partition=dirichlet", "partition.clients_per_domain=5", "partition.alpha=0.5"]


def scaled_cache(path: Path, scale: float) -> Path:
    """The DomainNet-sized cache (bench/common.py), or every domain shrunk by `scale`."""
    import numpy as np
    from planted import planted, write_cache

    if not path.exists():
        sizes = {k: max(345, int(v * scale)) for k, v in DOMAINNET_SIZES.items()}
        domains, text = planted(sizes, classes=345, dim=512, style_dims=64, noise=1.0)
        domains = {k: (x.astype(np.float32), y) for k, (x, y) in domains.items()}
        write_cache(path, domains, text, model_name="fedclip/planted", dataset_name="domainnet_sized")
    return path


def run(cache: Path, out: Path, overrides: list[str], threads: int) -> tuple[float, dict, list[str]]:
    """Seconds of a whole `python -m federate` process, its summary and its fedpft log lines."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args = [sys.executable, "-m", "federate", f"cache_file={cache}", "model.name=fedclip/planted",
            "target_domain=clipart", *PARTITION, *overrides, f"hydra.run.dir={out}"]
    t = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(overrides)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    lines = [line.split(" - ", 1)[-1] for line in (out / "federate.log").read_text().splitlines() if "fedpft:" in line
             and "one training row" not in line]
    return seconds, json.loads((out / "summary.json").read_text()), lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--scale", type=float, default=1.0, help="domain sizes x this (1: DomainNet's)")
    parser.add_argument("--variant", action="append", default=[], help="more fedpft overrides, space-separated")
    args = parser.parse_args()
    threads = args.threads or os.cpu_count()
    tmp = Path(tempfile.mkdtemp(prefix="fedclip-fedpft-bench-"))
    caches = args.cache_dir or tmp
    caches.mkdir(parents=True, exist_ok=True)
    name = "domainnet_sized.h5" if args.scale == 1 else f"domainnet_sized_x{args.scale:g}.h5"
    t = time.perf_counter()
    cache = scaled_cache(caches / name, args.scale)
    print(f"CPU, {os.cpu_count()} cores, {threads} threads; load average {os.getloadavg()[0]:.1f} at the start; "
          f"cache {cache} ({cache.stat().st_size / 1e9:.2f} GB, ready in {time.perf_counter() - t:.0f} s)")
    runs = {"fedclip rounds=1": ["method=fedclip", "rounds=1"], "fedpft (the baseline's recipe)": ["method=fedpft"]}
    runs.update({f"fedpft {v}": ["method=fedpft", *v.split()] for v in args.variant})
    best: dict[str, tuple[float, dict, list[str]]] = {}
    for repeat in range(args.repeats):
        for label, overrides in runs.items():
            got = run(cache, tmp / f"{len(best)}_{repeat}_{abs(hash(label))}", overrides, threads)
            if label not in best or got[0] < best[label][0]:
                best[label] = got
    base = best["fedclip rounds=1"][0]
    clients = len(best["fedclip rounds=1"][1]["clients"])
    print(f"{clients} clients, target clipart; whole process, set-up included (best of {args.repeats}):")
    for label, (seconds, s, lines) in best.items():
        sent = (s["bytes_total"]["up"] + s["bytes_total"]["down"]) / 1e6
        met = "met" if seconds < base else "NOT met"
        verdict = "" if label.startswith("fedclip") else f"  ({met}: the goal is < 1x)"
        print(f"   {label:40s} {seconds:7.1f} s ({seconds / base:.2f}x){verdict}   run {s['wall_seconds']:.1f} s   "
              f"target {100 * s['generalization']:.2f}%, clients {100 * s['personalization_mean']:.2f}%   "
              f"{sent:.1f} MB sent")
        for line in lines:
            print(f"      {line}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    main()
