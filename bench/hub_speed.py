"""Export and import of a DomainNet-sized cache (586,575 rows x 512 float32, 1.2 GB) against copying the
cache file on the same disk, in one run: each step runs in a fresh child process, which reports its wall
time and its peak resident memory (ru_maxrss: numpy's buffers included, which tracemalloc would miss).

    python bench/hub_speed.py                       # full size (needs about 4 GB free under --dir)
    python bench/hub_speed.py --rows 100000         # the same domains, scaled down
    python bench/hub_speed.py --dtype float16

Goal (issue 23): export and import each at most 3x the copy, peak memory under 2x the cache.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import DOMAINNET_SIZES, ROOT

STEP = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
step, a, b = sys.argv[1:4]
if step == "export":
    from extract.hub.export import export as run
elif step == "import":
    from extract.hub.rebuild import import_folder as run
else:
    import shutil
    run = shutil.copy
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
run(a, b)
wall = time.perf_counter() - t
print(json.dumps({{"wall": wall, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "base_mb": base / 1024}}))
"""


def make_cache(path: Path, rows: int, dtype: str) -> Path:
    """A planted cache with DomainNet's domains and classes, scaled to `rows` rows."""
    import numpy as np
    from planted import planted, write_cache

    from extract.identity import buffer_sha256, identity_sha256

    total = sum(DOMAINNET_SIZES.values())
    sizes = {d: max(1, round(n * rows / total)) for d, n in DOMAINNET_SIZES.items()}
    domains, text = planted(sizes, classes=345, dim=512, style_dims=64, noise=1.0)
    domains = {k: (x.astype(np.float32), y) for k, (x, y) in domains.items()}
    if dtype == "float32":
        return write_cache(path, domains, text, model_name="fedclip/planted", dataset_name="domainnet_sized")
    import h5py

    # float16: the same cache with its image embeddings stored in float16, written into a fresh file (a
    # dataset deleted from an HDF5 file leaves its space behind)
    full = write_cache(path.with_name("float32.h5"), domains, text, model_name="fedclip/planted",
                       dataset_name="domainnet_sized")
    with h5py.File(full, "r") as src, h5py.File(path, "w") as f:
        f.attrs.update(src.attrs)
        src.copy("text", f)
        for d, (x, _) in domains.items():
            for k in ("labels", "ids"):
                src.copy(f"domains/{d}/{k}", f.require_group(f"domains/{d}"))
            x = x.astype(dtype)
            f[f"domains/{d}/image_embeddings"] = x
            f[f"domains/{d}/image_embeddings"].attrs["sha256"] = buffer_sha256(x)
        f.attrs["image_dtype"] = dtype
        f.attrs["identity_sha256"] = identity_sha256(f.attrs)
    full.unlink()
    return path


def step(name: str, a: Path, b: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", STEP.format(root=str(ROOT)), name, str(a), str(b)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=sum(DOMAINNET_SIZES.values()))
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--repeat", type=int, default=3, help="runs of each step; the fastest counts")
    p.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temporary folder)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--make", default=None, help=argparse.SUPPRESS)  # the child that writes the cache
    args = p.parse_args()
    if args.make:
        make_cache(Path(args.make), args.rows, args.dtype)
        return
    work = Path(tempfile.mkdtemp(prefix="hub_speed-", dir=args.dir))
    try:
        cache = work / "cache.h5"
        # made in a child: a child's peak memory counts its parent's at the time it was started (ru_maxrss
        # survives exec on Linux), so this process stays small
        subprocess.run([sys.executable, __file__, "--make", str(cache), "--rows", str(args.rows), "--dtype", args.dtype],
                       check=True)
        size = cache.stat().st_size
        results = {}
        for _ in range(args.repeat):  # interleaved, so a busy moment of the machine hits every step alike
            for name, a, b in (("copy", cache, work / "copy.h5"), ("export", cache, work / "export"),
                               ("import", work / "export", work / "back.h5")):
                remove(b)  # an import onto the same cache would keep it ("nothing to do")
                r = step(name, a, b)
                best = results.get(name)
                results[name] = r if best is None or r["wall"] < best["wall"] else \
                    {**best, "peak_mb": max(best["peak_mb"], r["peak_mb"])}
                if name == "copy":
                    remove(b)
        parquet = sum(f.stat().st_size for f in (work / "export").rglob("*.parquet"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    copy = results["copy"]["wall"]
    print(f"cache: {args.rows:,} rows x 512 {args.dtype}, {size / 1e9:.2f} GB; Parquet {parquet / 1e9:.2f} GB; "
          f"best of {args.repeat}")
    print(f"{'step':<8} {'seconds':>8} {'x copy':>7} {'peak MB':>8} {'x cache':>8}  (interpreter and imports: MB)")
    for name, r in results.items():
        print(f"{name:<8} {r['wall']:>8.2f} {r['wall'] / copy:>7.2f} {r['peak_mb']:>8.0f} "
              f"{r['peak_mb'] * 2**20 / size:>8.2f}  ({r['base_mb']:.0f})")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": args.rows, "dtype": args.dtype, "cache_bytes": size,
                                              "parquet_bytes": parquet, "steps": results}, indent=2))


if __name__ == "__main__":
    main()
