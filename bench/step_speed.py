"""Where a large client's training step goes, against the step's floors, and the code against a baseline
revision measured in the same run.

    python bench/step_speed.py [--rows 30000] [--threads 1] [--rounds 5] [--baseline main] [--precision fp32]

It trains one client of --rows rows (d = 512, 345 classes, a DomainNet client's shape) for a round with
engine=sequential (the CPU default) and reports, per 32-row step: the whole round's time (best of --rounds
rounds), then the time of each piece (from the faster of two further rounds: AttAI's forward, the
loss, AttAI's backward, the Adam step, and the rest: the batch gather, the loop), timed around
each call), and two floors measured in the same process:
- matmul: the step's five [32, 512] x [512, 512]-sized products at the best-of-50 throughput of a
  [1, 32, 512] @ [1, 512, 512] bmm (the floor of bench/partition_speed.py);
- matmul + Adam: that, plus torch's fused Adam over the 525,312 parameters (best of 50), which reads and
  writes every weight and both moments each step.

With --baseline REV the training code of that revision (`git archive REV federate`, imported as
federate_baseline) trains the same rows in the same process, its rounds alternating with the current
code's (baseline, current, baseline, ...); the ratio is taken on the best of each. The machine is shared
and noisy: with one thread, rounds and pieces are timed in this process's CPU time (time it was not
run does not count), with more in wall time; compare only numbers from one run.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIECES = ("forward", "loss", "backward", "adam")
clock = time.perf_counter  # main() picks the CPU time of this process for one thread


def best_of(f, repeats: int = 50) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def floors(d: int = 512) -> dict:
    """Seconds per step: five products at a hot bmm's throughput, and that plus one fused Adam step."""
    import torch
    from torch.optim.adam import adam

    a, w = torch.randn(1, 32, d), torch.randn(1, d, d)
    matmul = 5 * best_of(lambda: torch.bmm(a, w))
    shapes = [(1, d, d), (1, d), (1, d, d), (1, d)]
    p, g, m = ([torch.randn(s) * 1e-2 for s in shapes] for _ in range(3))
    v, steps = [torch.rand(s) * 1e-4 for s in shapes], [torch.tensor(2.0) for _ in shapes]
    step = best_of(lambda: adam(p, g, m, v, [], steps, fused=True, amsgrad=False, beta1=0.9, beta2=0.98, lr=1e-4,
                                weight_decay=0.2, eps=1e-6, maximize=False))
    return {"matmul": matmul, "matmul_adam": matmul + step}


def timed_pieces(run, engine, attai) -> dict:
    """Seconds spent in each piece during `run()`, by wrapping the functions the engine calls."""
    spent = dict.fromkeys(PIECES, 0.0)
    adam = "adam_step" if hasattr(engine, "adam_step") else "adam"  # older revisions call torch's adam directly
    wrapped = [(attai, "forward", "forward"), (attai, "backward", "backward"), (engine, "contrastive_grad", "loss"),
               (engine, adam, "adam"), (engine, "first_adam_step", "adam")]
    originals = []
    for module, name, piece in wrapped:
        original = getattr(module, name)
        originals.append((module, name, original))

        def timed(*args, _f=original, _piece=piece, **kwargs):
            t = clock()
            out = _f(*args, **kwargs)
            spent[_piece] += clock() - t
            return out

        setattr(module, name, timed)
    try:
        spent["whole"] = run()
    finally:
        for module, name, original in originals:
            setattr(module, name, original)
    spent["rest"] = spent["whole"] - sum(spent[p] for p in PIECES)
    return spent


def baseline_package(revision: str) -> str:
    """The training code of `revision` (git archive of federate/), importable as `federate_baseline`."""
    folder = Path(tempfile.mkdtemp(prefix="fedclip-step-baseline-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    archive = subprocess.run(["git", "archive", revision, "federate"], cwd=ROOT, capture_output=True)
    if archive.returncode:
        raise SystemExit(f"git archive {revision} failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    (folder / "federate").rename(folder / "federate_baseline")  # the package imports itself relatively only
    sys.path.insert(0, str(folder))
    return "federate_baseline"


def measure(args) -> dict[str, dict]:
    """Per side (the current code, and the baseline's if any): seconds per step, whole and by piece, with
    the sides' rounds interleaved in this process on the same rows."""
    import importlib

    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    sys.path.insert(0, str(ROOT))
    packages = {"current": "federate"}
    if args.baseline:
        packages = {args.baseline: baseline_package(args.baseline), **packages}
    gen = torch.Generator().manual_seed(0)
    d, classes = 512, 345
    x = torch.nn.functional.normalize(torch.randn(args.rows, d, generator=gen), dim=-1)
    y = torch.randint(0, classes, (args.rows,), generator=gen)
    text = torch.randn(classes, d, generator=gen)
    steps = args.rows // 32 + (args.rows % 32 >= 2)
    runs, modules = {}, {}
    for name, package in packages.items():
        engine = importlib.import_module(f"{package}.engine")
        attai = importlib.import_module(f"{package}.adapters.attai")
        adapter = attai.AttAI()
        torch.manual_seed(0)
        state = {k: v[None].clone() for k, v in adapter.init(d, text).items()}
        # (ClientSets.of_tensors: the current API; a revision before pooled rows takes the tensors themselves)
        sets = engine.ClientSets.of_tensors([x], [y]) if hasattr(engine.ClientSets, "of_tensors") else \
            engine.ClientSets([x], [y])
        trainer = engine.make_trainer("sequential", adapter, sets, text, 100.0,
                                      engine.TrainSettings(lr=5e-5, precision=args.precision))

        def run(trainer=trainer, state=state, engine=engine) -> float:
            t = clock()
            trainer.train(state, 1, [engine.client_generator(0, "client", 1)])
            return clock() - t

        run()  # warm-up: buffers, first touch of the rows
        runs[name], modules[name] = run, (engine, attai)
    rounds = {name: [] for name in runs}
    for _ in range(args.rounds):  # interleaved: the machine's load changes from minute to minute
        for name, run in runs.items():
            rounds[name].append(run() / steps)
    out = {}
    for name, run in runs.items():
        pieces = min((timed_pieces(run, *modules[name]) for _ in range(2)), key=lambda p: p["whole"])
        out[name] = {"steps": steps, "step": min(rounds[name]), "rounds": rounds[name],
                     **{k: v / steps for k, v in pieces.items() if k != "whole"}, **floors()}
    return out


def line(name: str, r: dict) -> str:
    ms = {k: 1e3 * r[k] for k in ("step", *PIECES, "rest", "matmul", "matmul_adam")}
    return (f"   {name:9s} {ms['step']:.3f} ms/step = forward {ms['forward']:.3f} + loss {ms['loss']:.3f} + backward "
            f"{ms['backward']:.3f} + Adam {ms['adam']:.3f} + rest {ms['rest']:.3f} (pieces: the faster of two timed rounds); "
            f"{ms['step'] / ms['matmul']:.2f}x the matmul floor ({ms['matmul']:.3f} ms), "
            f"{ms['step'] / ms['matmul_adam']:.2f}x matmul + Adam ({ms['matmul_adam']:.3f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000, help="the client's training rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side, interleaved (best of)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--baseline", help="a git revision whose training code to measure against")
    args = parser.parse_args()
    global clock
    if args.threads == 1:  # on a shared machine, time this process was not run would count in wall time
        clock = time.process_time
    results = measure(args)
    current = results["current"]
    print(f"one client of {args.rows} rows, {current['steps']} steps of 32 rows, {args.precision}, "
          f"{args.threads} thread(s), best of {args.rounds} round(s) per side, "
          f"{'CPU' if clock is time.process_time else 'wall'} time; load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    for name, r in results.items():
        print(line(name, r))
    if args.baseline:
        base = results[args.baseline]
        ratios = [b / c for b, c in zip(base["rounds"], current["rounds"])]
        print(f"   current is {base['step'] / current['step']:.2f}x as fast as {args.baseline} "
              f"(best against best; round by round: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
