"""Why is a Flower deployment on loopback so much slower than Flower's simulation? Seconds per round of the
same run (a PACS-like planted cache, 3 clients) as a real deployment (flower-superlink and 3
flower-supernodes on 127.0.0.1, `flwr run`) and in the simulation engine (`backend=flower`), measured in
one run, with what a deployed round is made of:

- each round is two exchanges (train, then evaluate), and a SuperNode with nothing to do sleeps 3 s before
  it polls the SuperLink again (flwr 1.41's `start_client_internal`, not configurable): up to 3 s per
  exchange before a client even sees its message;
- each message starts a fresh ClientApp process (the SuperNode's default `subprocess` isolation), which
  imports torch, Flower and fedclip and reads its client's rows from the cache before it can train;
  in the simulation the ClientApps live in long-lived Ray actors that keep all of that.

    python bench/flower_deployment.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT

sys.path.insert(0, str(ROOT / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_seconds() -> float:
    """What a fresh ClientApp process pays before it handles a message: Python, torch, Flower, fedclip."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import federate.flower.client_app"], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t


def deployed(cache: Path, rounds: int, tmp: Path) -> list[float]:
    """Seconds between the ends of consecutive rounds (from the start of `flwr run`) of a deployment."""
    home = tmp / "flwr_home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    bindir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(ROOT), "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    procs = [subprocess.Popen([bindir / "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                               "--host", "127.0.0.1", "--port", str(port), "--database", str(home / "state.db")],
                              cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    for d in ("alpha", "beta", "gamma"):
        procs.append(subprocess.Popen([bindir / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                                       "--port", str(free_port()), "--node-config", f"partition='{d}' cache-file='{cache}'"],
                                      cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
    try:
        time.sleep(15)  # the SuperNodes register
        out = tmp / "deployed"
        settings = f"cache_file={cache} model.name=fedclip/planted target_domain=target lr=0.001 rounds={rounds}"
        start = time.perf_counter()
        subprocess.run([bindir / "flwr", "run", str(ROOT), "bench", "--run-config",
                        f"output_dir={json.dumps(str(out))} overrides={json.dumps(settings)}"],
                       env=env, cwd=home, check=True, capture_output=True)
        ends, history = [], out / "history.jsonl"
        while not (out / "summary.json").exists() and time.perf_counter() - start < 60 * rounds + 120:
            n = history.read_text().count("\n") if history.exists() else 0
            while len(ends) < n:
                ends.append(time.perf_counter() - start)
            time.sleep(0.2)
        return ends
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass


def simulated(cache: Path, rounds: int, tmp: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "federate", f"cache_file={cache}", "model.name=fedclip/planted",
                    "target_domain=target", "lr=0.001", f"rounds={rounds}", "backend=flower",
                    f"hydra.run.dir={tmp / 'simulated'}"], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from planted import planted, write_cache

    tmp = Path(tempfile.mkdtemp(prefix="fedclip-flower-bench-"))
    domains, text = planted({"alpha": 260, "beta": 200, "gamma": 150, "target": 240})
    cache = write_cache(tmp / "planted.h5", domains, text)
    print(f"CPU, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the start; {args.rounds} rounds")
    print(f"a fresh ClientApp process imports torch, Flower and fedclip in {import_seconds():.2f} s")
    sim = simulated(cache, args.rounds, tmp)
    ends = deployed(cache, args.rounds, tmp)
    per_round = [b - a for a, b in zip(ends, ends[1:])]
    print(f"simulation (python -m federate backend=flower): {sim:.1f} s in all, set-up included")
    if per_round:
        print(f"deployment: first round ended after {ends[0]:.1f} s; then {sum(per_round) / len(per_round):.1f} s per "
              f"round (rounds {', '.join(f'{s:.1f}' for s in per_round)})")
    else:
        print(f"deployment: rounds ended at {ends}")


if __name__ == "__main__":
    main()
