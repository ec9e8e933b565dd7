"""What does a personalized-FL or feature-statistics round cost next to a FedCLIP round on the same
clients? Whole rounds (local training, aggregation, evaluation) of each method, interleaved with
FedCLIP's in the same process, best of --repeats; the goals: fedper with 300 clients at most 1.5x
FedCLIP's round, fedproto and ccvr at most 1.3x. A method's exchange after the rounds (ccvr's calibration)
is timed on its own, once, and left out of its rounds.

    python bench/method_speed.py [--methods fedper,fedrep,...] [--repeats 3] [--rounds 2] [--threads N]
        [--clients 100] [--cache-dir DIR]

PACS-sized planted cache (target art_painting, 4,765 training rows), partition=iid with
--clients per domain (100: 300 clients of about 16 training rows; 1: partition=domain, 3 clients), AttAI;
engine=auto.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import pacs_sized_cache, prepare
from partition_speed import compose, timed_rounds

METHODS = ("fedper", "fedrep", "fedbabu", "fedrod", "ditto", "apfl", "local", "fedproto", "ccvr")


def after_rounds_seconds(point) -> float:
    """Seconds of the method's exchange after the rounds (requested, trained, aggregated, evaluated)."""
    from federate.federation import drive

    fed = point.federation
    step = type(fed.method).after_rounds(fed.method)
    if not step:
        return 0.0
    from federate.run import CachedBackend

    backend = CachedBackend(point)
    t = time.perf_counter()
    drive(fed._after_rounds(step, backend), lambda r, sampled: backend.train(fed, r, sampled))
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=100, help="clients per domain (partition=iid; 1: domain)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cache-dir", type=Path)
    args = parser.parse_args()
    import torch

    from federate.methods import METHODS as REGISTERED

    tmp, caches = prepare(args.threads, args.cache_dir, "method")
    cache = pacs_sized_cache(caches / "pacs_sized.h5")
    names = ["fedclip", *args.methods.split(",")]
    partition = ["partition=iid", f"partition.clients_per_domain={args.clients}"] if args.clients > 1 else []
    print(f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.1f} at the start; {args.rounds} rounds per run, best of {args.repeats}")
    best: dict[str, tuple[float, float]] = {}
    after: dict[str, float] = {}
    clients = 0
    for repeat in range(args.repeats):
        for name in names:
            cfg = compose(cache, ["target_domain=art_painting", f"rounds={args.rounds}", f"method={name}",
                                  *(["loss=ce"] if name not in ("fedclip", "local") else []), *partition])
            cls = REGISTERED[name]
            own = cls.__dict__.get("after_rounds")
            cls.after_rounds = lambda self: None  # the rounds alone
            try:
                whole, train, point, _ = timed_rounds(cfg, tmp / f"{name}_{repeat}", args.rounds)
            finally:
                if own is None:
                    del cls.after_rounds
                else:
                    cls.after_rounds = own
            seconds = after_rounds_seconds(point)
            if seconds:
                after[name] = min(seconds, after.get(name, seconds))
            old = best.get(name, (whole, train))
            best[name] = (min(whole, old[0]), min(train, old[1]))
            clients = len(point.clients)
    base = best["fedclip"]
    print(f"PACS-sized, target art_painting, {clients} clients (seconds per round):")
    for name, (whole, train) in best.items():
        print(f"   {name:8s} whole round {whole:.3f} s ({whole / base[0]:.2f}x fedclip)   local training {train:.3f} s "
              f"({train / base[1]:.2f}x)" + (f"   after the rounds, once: {after[name]:.3f} s" if name in after
                                              else ""))


if __name__ == "__main__":
    main()
