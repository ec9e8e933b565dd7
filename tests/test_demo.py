"""The README's first command, end to end through the CLI: offline demo extraction, then federation."""
import json

from conftest import run_cli


def test_offline_demo_runs_end_to_end(tmp_path):
    common = ["dataset=demo", "model=tiny_random", f"cache_dir={tmp_path}/cache"]
    proc = run_cli("extract", *common, f"hydra.run.dir={tmp_path}/x", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert (tmp_path / "cache/datasets/demo/sketch/star/0000.png").exists()
    assert (tmp_path / "cache/models/fedclip--tiny-random-clip/model.safetensors").exists()
    assert (tmp_path / "cache/demo/fedclip--tiny-random-clip.h5").exists()

    proc = run_cli("federate", *common, "rounds=5", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["dataset"] == "demo" and summary["target_domain"] == "cartoon" and summary["rounds"] == 5
    assert set(summary["personalization"]) == {"photo", "sketch"}
    assert (tmp_path / "run/adapter.safetensors").exists() and len((tmp_path / "run/history.jsonl").read_text().splitlines()) == 5
    assert "round 5/5" in proc.stdout and "best round" in proc.stdout
