"""How fast is a 200-round FedCLIP run on a PACS-sized cache: the engines against a plain per-client,
per-batch PyTorch loop, and precision=bf16 against fp32, all measured in the same run.

    python bench/federate_speed.py [--rounds 200] [--plain-rounds 10] [--repeats 2]

1. whole process: `python -m federate` with 200 rounds, target art_painting, engine=auto, in fp32 and in
   bf16 (wall clock, startup included), and the accuracies each reaches (summary.json);
2. in-process, --plain-rounds rounds of each engine: engine=sequential (the CPU default), engine=batched
   (lock step), engine=generic (torch.func on AttAI) and engine=plain (the baseline) in fp32, and the
   fast path (sequential, batched) in bf16: seconds per round (best of --repeats, interleaved), ratios
   against plain and bf16 against fp32, and the accuracies each reaches.
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

from common import ROOT, pacs_sized_cache

RUNS = [("sequential", "fp32"), ("batched", "fp32"), ("generic", "fp32"), ("plain", "fp32"),
        ("sequential", "bf16"), ("batched", "bf16")]


def accuracy_line(s: dict) -> str:
    return (f"generalization {100 * s['generalization']:.2f}%  personalization mean "
            f"{100 * s['personalization_mean']:.2f}%  overall {100 * s['overall']:.2f}%  best round {s['best_round']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="rounds of the whole-process runs (0: skip them)")
    parser.add_argument("--plain-rounds", type=int, default=10, help="rounds of each in-process run")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedclip-bench-"))
    cache = pacs_sized_cache(tmp / "pacs_sized.h5")
    common = [f"cache_file={cache}", "model.name=fedclip/planted", "target_domain=art_painting"]

    whole, whole_summary = {}, {}
    for precision in ("fp32", "bf16") if args.rounds else ():
        out = tmp / f"full_{precision}"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "federate", *common, f"rounds={args.rounds}", f"precision={precision}",
                        f"hydra.run.dir={out}"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        whole[precision] = time.perf_counter() - start
        whole_summary[precision] = json.loads((out / "summary.json").read_text())

    from hydra import compose, initialize_config_dir

    from federate.cache import load_cache
    from federate.run import run

    load_cache(cache)  # read once, outside the timings (runs of one process share it)
    per_round, results = {}, {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for repeat in range(args.repeats):  # best of n, interleaved: this machine is noisy
            for engine, precision in RUNS:
                cfg = compose("federate", [*common, f"rounds={args.plain_rounds}", f"engine={engine}",
                                           f"precision={precision}"])
                t = time.perf_counter()
                results[engine, precision] = run(cfg, tmp / f"{engine}_{precision}_{repeat}")
                seconds = (time.perf_counter() - t) / args.plain_rounds
                per_round[engine, precision] = min(seconds, per_round.get((engine, precision), seconds))

    import torch

    print(f"device: CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("PACS-sized cache (2048/2344/1670/3929 x 512, 7 classes), target art_painting, 4,765 training rows")
    for precision, seconds in whole.items():
        print(f"whole process, {args.rounds} rounds, engine=auto, precision={precision}: {seconds:.1f} s wall   "
              + accuracy_line(whole_summary[precision]))
    if whole:
        gap = 100 * max(abs(whole_summary["bf16"][k] - whole_summary["fp32"][k])
                        for k in ("generalization", "personalization_mean", "overall"))
        print(f"whole process bf16 vs fp32: {whole['fp32'] / whole['bf16']:.2f}x faster; accuracies within "
              f"{gap:.2f} points ({'yes' if gap <= 1 else 'NO'}: the goal is 1 point)")
    plain = per_round["plain", "fp32"]
    print(f"{args.plain_rounds} rounds in-process (evaluation included), best of {args.repeats}, seconds per round "
          "(ratio against plain fp32, same run):")
    for (engine, precision), s in results.items():
        print(f"  {engine:10s} {precision}  {per_round[engine, precision]:.3f} s/round  "
              f"{plain / per_round[engine, precision]:4.1f}x   " + accuracy_line(s))
    for engine in ("sequential", "batched"):
        print(f"bf16 vs fp32, engine={engine}: {per_round[engine, 'fp32'] / per_round[engine, 'bf16']:.2f}x per round")
    print(f"fast path (sequential) vs generic on AttAI: "
          f"{per_round['generic', 'fp32'] / per_round['sequential', 'fp32']:.2f}x")
    gap = max(abs(s["overall"] - results["plain", "fp32"]["overall"]) for (e, p), s in results.items() if p == "fp32")
    print(f"fp32 engines, same accuracy within noise: {'yes' if gap < 0.005 else 'NO'} "
          f"(overall differs by {100 * gap:.3f} points at most)")


if __name__ == "__main__":
    main()
