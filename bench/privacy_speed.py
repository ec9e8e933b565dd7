"""What does a DP-SGD step cost next to a non-private step of the same engine? Local training of the same
clients with and without privacy=dpsgd, interleaved in one process, best of --repeats; the goal is at most
2x. Both train with cross-entropy (DP-SGD's per-sample loss) and take the same number of steps (b per epoch:
DP-SGD's Poisson batches have the expected size n / b, the others batch_size).

    python bench/privacy_speed.py [--engines sequential,generic] [--repeats 3] [--rounds 2] [--threads 1]
        [--adapter attai] [--method fedclip] [--cache-dir DIR]

PACS-sized planted cache (target art_painting, 3 clients, 4,765 training rows), AttAI at d = 512 (525,312
parameters). sequential: AttAI's fast path (per-sample norms from the layers' row gradients); generic:
torch.func's per-sample gradients (any adapter); batched: the lock-step fast path. On a CPU DP-SGD draws the
next step's noise on a worker thread (federate/engine.py NoiseAhead): the wall-clock ratio counts a second
core, the CPU-time ratio does not.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from common import pacs_sized_cache, prepare
from partition_speed import compose, timed_rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="sequential,generic")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--adapter", default="attai")
    parser.add_argument("--method", default="fedclip", help="e.g. fedper: AttAI under a linear head")
    parser.add_argument("--cache-dir", type=Path)
    args = parser.parse_args()
    import torch

    from federate.engine import poisson_rate

    tmp, caches = prepare(args.threads, args.cache_dir, "privacy")
    cache = pacs_sized_cache(caches / "pacs_sized.h5")
    print(f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.1f} at the start; {args.rounds} rounds of local training per run, best of "
          f"{args.repeats}")
    best: dict[tuple[str, bool], tuple[float, float]] = {}  # (wall, CPU) seconds of local training per round
    steps = 0
    for repeat in range(args.repeats):
        for engine in args.engines.split(","):
            for private in (False, True):
                extra = ["privacy=dpsgd", "privacy.noise_multiplier=1.0"] if private else ["loss=ce"]
                cfg = compose(cache, ["target_domain=art_painting", f"rounds={args.rounds}", f"engine={engine}",
                                      f"adapter={args.adapter}", f"method={args.method}", *extra])
                _, train, point, (_, train_cpu) = timed_rounds(cfg, tmp / f"{engine}_{private}_{repeat}", args.rounds)
                steps = sum(poisson_rate(len(s), int(cfg.batch_size))[0] for s in point.train_sets)
                old = best.get((engine, private), (train, train_cpu))
                best[engine, private] = (min(train, old[0]), min(train_cpu, old[1]))
    print(f"PACS-sized, target art_painting, method {args.method}, adapter {args.adapter}: {steps} steps per round "
          "(all clients)")
    print("   (CPU: this process's CPU time, the noise's worker thread included)")
    for engine in args.engines.split(","):
        (plain, plain_cpu), (dp, dp_cpu) = best[engine, False], best[engine, True]
        print(f"   {engine:10s} non-private {1e3 * plain / steps:.2f} ms/step   DP-SGD {1e3 * dp / steps:.2f} ms/step   "
              f"ratio {dp / plain:.2f}x   (CPU {1e3 * plain_cpu / steps:.2f} and {1e3 * dp_cpu / steps:.2f} ms/step: "
              f"{dp_cpu / plain_cpu:.2f}x)")


if __name__ == "__main__":
    main()
