"""The benchmarks (bench/) still run against the code they time: every name they import from the project
exists, and partition_speed's rounds, which reach into the runner's internals, run on a tiny cache.
(bench/partition_speed.py broke once, unnoticed, when the round loop moved to federate/federation.py.)"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import sys

import pytest
from conftest import ROOT

BENCH = ROOT / "bench"
PROJECT = ("federate", "extract")
sys.path.insert(0, str(BENCH))  # the benchmarks import their `common`


def project_imports(path) -> list[tuple[str, str]]:
    """(module, name) of every `from federate... / extract... import name` in a file, inside functions too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.partition(".")[0] in PROJECT:
            out += [(node.module, alias.name) for alias in node.names]
    return out


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_every_project_name_a_benchmark_imports_exists(script):
    for module, name in project_imports(BENCH / script):
        found = importlib.import_module(module)
        submodule = hasattr(found, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None
        assert hasattr(found, name) or submodule, f"bench/{script}: {module} has no {name}"


def test_partition_speed_times_the_rounds_of_a_tiny_run(planted_cache, tmp_path):
    import partition_speed

    cfg = partition_speed.compose(planted_cache, ["target_domain=target", "rounds=2"])
    whole, train, point, _ = partition_speed.timed_rounds(cfg, tmp_path / "run", 2)
    assert whole > 0 and train > 0 and point.federation.done == 2
    assert partition_speed.round_flops(point) > 0


def test_method_speed_times_a_methods_exchange_after_the_rounds_on_its_own(planted_cache, tmp_path):
    import method_speed
    import partition_speed

    cfg = partition_speed.compose(planted_cache, ["target_domain=target", "rounds=2", "method=ccvr", "loss=ce"])
    _, _, point, _ = partition_speed.timed_rounds(cfg, tmp_path / "run", 2)
    assert point.federation.before is not None  # (timed_rounds ran the calibration with the rounds)
    assert method_speed.after_rounds_seconds(point) > 0
