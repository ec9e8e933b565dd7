"""The paper's protocol sweep (4 target domains x 3 learning rates x 3 seeds = 36 FedCLIP runs) on a
PACS-sized cache: grouped as hydra/launcher=batched trains it (federate.sweep.train_group, one
computation) against one run at a time in the same process, in fp32 and in bf16.

    python bench/sweep_speed.py [--rounds 20] [--protocol-rounds 200] [--alone-points 4]

Each grouped sweep runs all 36 points for --rounds rounds; the one-at-a-time baseline runs the first
--alone-points points (one per target domain) for --rounds rounds. Figures are scaled to the whole
protocol (36 points x --protocol-rounds rounds); --rounds 200 measures the whole protocol directly.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import ROOT, pacs_sized_cache

TARGETS = ("art_painting", "cartoon", "photo", "sketch")
LRS = ("5e-5", "1e-4", "5e-4")
SEEDS = (0, 1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--protocol-rounds", type=int, default=200)
    parser.add_argument("--alone-points", type=int, default=4)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedclip-sweep-bench-"))
    cache = pacs_sized_cache(tmp / "pacs_sized.h5")

    import torch
    from hydra import compose, initialize_config_dir

    from federate import sweep
    from federate.cache import load_cache
    from federate.run import run

    load_cache(cache)
    points = [(t, lr, seed) for t in TARGETS for lr in LRS for seed in SEEDS]
    alone_points = [p for i, p in enumerate(points) if i % (len(points) // args.alone_points) == 0][:args.alone_points]
    seconds, accuracy = {}, {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        def cfg(point, precision):
            t, lr, seed = point
            return compose("federate", [f"cache_file={cache}", "model.name=fedclip/planted", f"target_domain={t}",
                                        f"lr={lr}", f"seed={seed}", f"rounds={args.rounds}", f"precision={precision}"])

        for precision in ("fp32", "bf16"):
            out = tmp / f"alone_{precision}"
            start = time.perf_counter()
            for i, p in enumerate(alone_points):
                run(cfg(p, precision), out / str(i))
            seconds["alone", precision] = (time.perf_counter() - start) / len(alone_points) / args.rounds

            out = tmp / f"grouped_{precision}"
            cfgs = [cfg(p, precision) for p in points]
            dirs = [out / str(i) for i in range(len(points))]
            start = time.perf_counter()
            sweep.train_group(cfgs, dirs)
            summaries = [run(c, d) for c, d in zip(cfgs, dirs)]  # hand the prepared results over
            seconds["grouped", precision] = (time.perf_counter() - start) / len(points) / args.rounds
            accuracy[precision] = sum(s["overall"] for s in summaries) / len(summaries)
            shutil.rmtree(out)

    scale = len(points) * args.protocol_rounds
    print(f"device: CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"PACS-sized cache, {len(points)} points (4 targets x 3 lr x 3 seeds), {args.rounds} rounds measured, "
          f"scaled to {args.protocol_rounds} rounds per point")
    for how in ("alone", "grouped"):
        for precision in ("fp32", "bf16"):
            s = seconds[how, precision]
            print(f"  {how:8s} {precision}: {s:.3f} s per point-round; whole protocol {s * scale / 60:.1f} min  "
                  f"({seconds['alone', 'fp32'] / s:.2f}x one-at-a-time fp32)")
    print(f"mean overall accuracy of the {len(points)} grouped points after {args.rounds} rounds: "
          f"fp32 {100 * accuracy['fp32']:.2f}%, bf16 {100 * accuracy['bf16']:.2f}%")
    best = seconds["grouped", "bf16"] * scale / 60
    print(f"goal, the whole protocol in at most 10 minutes with bf16: {'met' if best <= 10 else 'NOT met'} "
          f"({best:.1f} min)")


if __name__ == "__main__":
    main()
