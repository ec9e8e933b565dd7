"""Do many clients cost what their rows cost, and how close is a DomainNet-sized round to the machine's
floor? Ratios are measured in the same process, interleaved, best of --repeats.

    python bench/partition_speed.py [--repeats 3] [--threads N] [--domainnet] [--domainnet-rounds 1]
        [--no-pacs] [--no-process] [--cache-dir DIR]

1. PACS-sized cache (target art_painting, 4,765 training rows): seconds per round of local training
   (the training alone, as a round runs it: federate/run.py CachedBackend.train, engine=auto on a CPU,
   which adds the clients up as they train) and of a whole round (training,
   aggregation, evaluation: federate/run.py's loop) with partition=domain (3 clients) and
   partition=iid partition.clients_per_domain=100 (300 clients of about 15 training rows); the goal is a
   ratio of at most 1.5.
2. --domainnet: a DomainNet-sized cache (586,575 rows x 512, 345 classes, 6 domains, target clipart):
   seconds per round against the floor, the round's multiply-adds at the matmul throughput measured
   here (and that floor plus the round's fused Adam steps, bench/step_speed.py), and the peak resident
   memory of a whole `python -m federate` process against the cache's size.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, domainnet_sized_cache, pacs_sized_cache, prepare

PARTITIONS = {"domain (3 clients)": [], "iid x100 (300 clients)": ["partition=iid", "partition.clients_per_domain=100"]}


def matmul_gflops(rows: int, d: int = 512, repeats: int = 50) -> float:
    """Measured fp32 throughput of a [1, rows, d] @ [1, d, d] multiply (rows=32: the engine's batch),
    best of `repeats`."""
    import torch

    a, w = torch.randn(1, rows, d), torch.randn(1, d, d)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.bmm(a, w)
        best = min(best, time.perf_counter() - t)
    return 2 * rows * d * d / best / 1e9


def floors(point) -> tuple[str, float, float]:
    """The round's floor (a line, and seconds) at two measured throughputs: a multiply of the engine's
    batch shape and a large one."""
    flops = round_flops(point)
    small, large = matmul_gflops(32), matmul_gflops(4096)
    return (f"{flops / 1e9:.0f} GFLOP: floor {flops / small / 1e9:.2f} s at the {small:.0f} GFLOP/s of a [32, 512] x "
            f"[512, 512] multiply, {flops / large / 1e9:.2f} s at the {large:.0f} GFLOP/s of a [4096, 512] one"), \
        flops / small / 1e9, flops / large / 1e9


def adam_floor(point) -> tuple[float, int]:
    """Seconds of the round's Adam steps at torch's fused Adam over one adapter (best of 50, one step per
    32-row batch: it reads and writes every weight and both moments, a cost the multiply-adds leave out),
    and the number of steps."""
    from federate.engine import batches_per_epoch
    from step_speed import floors as step_floors

    steps = sum(batches_per_epoch(len(c.train), int(point.cfg.batch_size)) for c in point.clients) \
        * int(point.cfg.local_epochs)
    per_step = step_floors()
    return steps * (per_step["matmul_adam"] - per_step["matmul"]), steps


def round_flops(point) -> float:
    """Multiply-adds x 2 of one round: AttAI's forward (2 d x d products) and backward (3) on every
    training row, its forward and the class logits (d x C) on every evaluated row (validation, and test
    and target, which a round that improves evaluates: the first round always does)."""
    d, C = point.cache.embed_dim, len(point.cache.class_names)
    train = sum(len(c.train) for c in point.clients) * int(point.cfg.local_epochs)
    evaluated = sum(len(c.val) + len(c.test) for c in point.clients) + len(point.target_set)
    return train * 5 * 2 * d * d + evaluated * (2 * 2 * d * d + 2 * d * C)


def compose(cache: Path, overrides: list[str]):
    import federate  # noqa: F401  (registers the config schema)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("federate", [f"cache_file={cache}", "model.name=fedclip/planted", *overrides])


def timed_rounds(cfg, out: Path, rounds: int):
    """(seconds per whole round, seconds per round of local training alone, the point, and both seconds
    in this process's CPU time) of a fresh run."""
    from federate.experiment import check_settings
    from federate.run import CachedBackend, setup

    out.mkdir(parents=True)
    point = setup(cfg, check_settings(cfg), out, progress=False)
    backend = CachedBackend(point)
    t, cpu = time.perf_counter(), time.process_time()
    point.federation.run(backend)
    whole, whole_cpu = (time.perf_counter() - t) / rounds, (time.process_time() - cpu) / rounds
    federation, units = point.federation, list(range(len(point.train_sets)))
    t, cpu = time.perf_counter(), time.process_time()
    for r in range(rounds):  # local training alone, as the rounds ran it (the clients added up as they train)
        backend.train(federation, rounds + 1 + r, units)
    train, train_cpu = (time.perf_counter() - t) / rounds, (time.process_time() - cpu) / rounds
    return whole, train, point, (whole_cpu, train_cpu)


def many_clients(tmp: Path, caches: Path, repeats: int, rounds: int) -> None:
    cache = pacs_sized_cache(caches / "pacs_sized.h5")
    best: dict[str, tuple[float, float]] = {}
    sizes, points = {}, {}
    for repeat in range(repeats):
        for name, overrides in PARTITIONS.items():
            cfg = compose(cache, ["target_domain=art_painting", f"rounds={rounds}", *overrides])
            whole, train, point, _ = timed_rounds(cfg, tmp / f"pacs_{len(overrides)}_{repeat}", rounds)
            old = best.get(name, (whole, train))
            best[name] = (min(whole, old[0]), min(train, old[1]))
            sizes[name] = (len(point.clients), sum(len(c.train) for c in point.clients))
            points[name] = point
    base = best["domain (3 clients)"]
    text, small, large = floors(points["domain (3 clients)"])
    print(f"1. PACS-sized, target art_painting, {rounds} rounds per run, best of {repeats} (seconds per round):")
    for name, (whole, train) in best.items():
        print(f"   {name:24s} {sizes[name][1]:5d} training rows   local training {train:.3f} s "
              f"({train / base[1]:.2f}x)   whole round {whole:.3f} s ({whole / base[0]:.2f}x)")
    print(f"   domain round: {text}: {base[0] / small:.2f}x and {base[0] / large:.2f}x the floors")
    ratio = best["iid x100 (300 clients)"][0] / base[0]
    print(f"   300 clients vs 3, whole round: {ratio:.2f}x ({'met' if ratio <= 1.5 else 'NOT met'}: the goal is 1.5x)")


def domainnet(tmp: Path, caches: Path, rounds: int, with_process: bool = True) -> None:
    import torch

    cache = domainnet_sized_cache(caches / "domainnet_sized.h5")
    from federate.cache import load_cache

    load_cache(cache)
    cfg = compose(cache, [f"rounds={rounds}"])
    whole, train, point, (whole_cpu, train_cpu) = timed_rounds(cfg, tmp / "dn", rounds)
    text, small, large = floors(point)
    adam, steps = adam_floor(point)
    size = Path(cache).stat().st_size
    print(f"2. DomainNet-sized (586,575 x 512, 345 classes), target clipart, {rounds} round(s):")
    print(f"   whole round {whole:.1f} s (local training alone {train:.1f} s); {text}: {whole / small:.2f}x and "
          f"{whole / large:.2f}x the floors")
    print(f"   with the {steps} training steps' fused Adam ({adam:.2f} s) added to the first floor: "
          f"{small + adam:.2f} s, {whole / (small + adam):.2f}x")
    if torch.get_num_threads() == 1:  # on a shared machine: the time this process was run
        print(f"   in CPU time: whole round {whole_cpu:.1f} s (local training alone {train_cpu:.1f} s): "
              f"{whole_cpu / small:.2f}x the first floor, {whole_cpu / (small + adam):.2f}x with Adam")
    if not with_process:
        return
    out = tmp / "dn_process"

    threads = str(torch.get_num_threads())  # the same threads as the in-process round
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report this process's peak
    code = ("import runpy, sys; sys.argv = ['federate', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('federate', run_name='__main__')\n"
            "finally:\n    print('maxrss_kb', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], "
            "file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, f"cache_file={cache}", "model.name=fedclip/planted", "rounds=1",
                           f"hydra.run.dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True)
    rss = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("maxrss_kb")]
    if rss:
        print(f"   peak resident memory of python -m federate rounds=1: {rss[0] / 1024:.0f} MB for a "
              f"{size / 1e6:.0f} MB cache ({rss[0] * 1024 / size:.2f}x)")
    else:
        print(f"   the whole-process run failed: {proc.stderr.strip().splitlines()[-1:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per PACS-sized run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--domainnet", action="store_true", help="also the DomainNet-sized round (minutes)")
    parser.add_argument("--domainnet-rounds", type=int, default=1)
    parser.add_argument("--no-pacs", action="store_true", help="skip the PACS-sized runs (1.)")
    parser.add_argument("--no-process", action="store_true", help="skip the whole-process memory run of 2.")
    parser.add_argument("--cache-dir", type=Path, help="keep the planted caches here, to reuse them in later runs "
                        "(default: a fresh temporary folder)")
    args = parser.parse_args()
    import torch

    tmp, caches = prepare(args.threads, args.cache_dir, "partition")
    print(f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    if not args.no_pacs:
        many_clients(tmp, caches, args.repeats, args.rounds)
    if args.domainnet:
        domainnet(tmp, caches, args.domainnet_rounds, with_process=not args.no_process)


if __name__ == "__main__":
    main()
