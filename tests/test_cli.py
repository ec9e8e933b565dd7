"""The command lines as a newcomer meets them: the README's own adapter example run verbatim from any folder,
unknown settings refused with the closest known one, every bad setting and Ctrl-C as one line, and a refused
run that leaves the folders it was pointed at, or made, as they were."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, config, run_cli, run_federate
from omegaconf import OmegaConf

import extract.config  # noqa: F401  (registers extract's schema, as python -m extract does)
from federate.callbacks import FederateErrors
from federate.cli import CONF_DIR
from federate.errors import ConfigError

README = (ROOT / "README.md").read_text()


def readme_file(name: str) -> str:
    """The README's code block (python or yaml) that starts with `# <name>`."""
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", README, re.S)
    return next(b for b in blocks if b.startswith(f"# {name}"))


def readme_commands(after: str) -> list[str]:
    """The commands of the README's first bash block after the line `after` (comments cut)."""
    rest = README[README.index(after):]
    block = re.search(r"```bash\n(.*?)```", rest, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def one_error_line(proc, status: int = 2) -> str:
    assert proc.returncode == status, proc.stdout
    assert "Traceback" not in proc.stdout, proc.stdout
    errors = [line for line in proc.stdout.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and proc.stdout.strip().splitlines()[-1] == errors[0], proc.stdout
    return errors[0]


@pytest.mark.slow
@pytest.mark.slow
def test_the_readmes_own_adapter_and_method_examples_run_as_written_from_any_folder(tmp_path):
    """Every file and command of "Add your own adapter" and "Add your own method", in a folder outside the
    clone, with fedclip importable as an installed package is."""
    for name in ("my_adapters.py", "run_federate.py", "my_methods.py", "lg_fedavg.yaml"):
        (tmp_path / name).write_text(readme_file(name))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # as an installed fedclip
    commands = readme_commands("## Add your own adapter") + readme_commands("## Add your own method")
    assert commands[0].startswith("python -m extract") and len(commands) == 4
    for command in commands:
        argv = shlex.split(command)
        argv = [sys.executable, *argv[1:]] + (["rounds=3"] if "rounds=" not in command and "federate" in command
                                              else [])
        proc = subprocess.run(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=300)
        assert proc.returncode == 0, (command, proc.stdout)
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("summary.json")]
    scale = next(s for s in summaries if s["adapter"]["name"] == "scale")
    assert scale["adapter"]["init_scale"] == 0.5 and scale["lr"] == 0.001
    lg = [s for s in summaries if s["method"] == "lg_fedavg"]
    assert len(lg) == 2 and all(s["loss"] == "ce" for s in lg)
    assert lg[0]["shared_params"] == 4 * 64 + 4  # the head (4 demo classes, dim 64) is what is sent
    assert {s["method"] for s in summaries} == {"fedclip", "lg_fedavg", "fedper"}


# unknown settings ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, argv, message", [
    ("federate", ["lrr=1e-3"], "lrr is not a setting of federate; did you mean lr?"),
    ("federate", ["+lrr=1e-3"], "+lrr is not a setting of federate; did you mean lr?"),
    ("federate", ["++lrr=1e-3"], "++lrr is not a setting of federate; did you mean lr?"),
    ("federate", ["~sed"], "~sed is not a setting of federate; did you mean seed?"),
    ("federate", ["flower.min_client=3"], "flower.min_client is not a setting of federate; did you mean flower.min_clients?"),
    ("federate", ["adapter=clip_adapter", "+adapter.ration=0.3"], "did you mean adapter.ratio?"),
    ("federate", ["-m", "lr=1e-3,1e-4", "seeds=0,1"], "seeds is not a setting of federate; did you mean seed?"),
    ("federate", ["--cfg", "job", "lrr=1"], "lrr is not a setting of federate; did you mean lr?"),
    ("extract", ["+prompt_template=[x]"], "+prompt_template is not a setting of extract; did you mean prompt_templates?"),
    ("extract", ["dataset=demo", "dataset.generate.image_per_class=3"], "did you mean dataset.generate.images_per_class?"),
])
def test_an_unknown_setting_names_the_closest_known_one(command, argv, message):
    from federate.cli import unknown_setting

    assert message in unknown_setting(argv, command)


@pytest.mark.parametrize("command, argv", [
    ("federate", ["lr=1e-3", "seed=3", "flower.min_clients=3", "~target_domain", "hydra.run.dir=x", "hydra/launcher=batched"]),
    ("federate", ["adapter=clip_adapter", "adapter.ratio=0.3", "dataset=demo", "dataset.root=/x"]),
    ("federate", ["-m", "adapter=attai,clip_adapter", "adapter.reduction=2", "lr=1e-3,1e-4"]),  # a key of one option
    ("federate", ["method=fedprox", "method.mu=0.1", "+hydra.job.env_set.X=1"]),
    ("extract", ["dataset=demo", "dataset.generate.images_per_class=3", "model=tiny_random", "model.build.layers=1"]),
])
def test_known_settings_pass(command, argv):
    from federate.cli import unknown_setting

    assert unknown_setting(argv, command) is None


def test_the_known_settings_come_from_the_composed_config_not_a_list(monkeypatch):
    """An option registered in code (as the README's own adapter is) brings its settings along."""
    from hydra.core.config_store import ConfigStore

    from federate.cli import unknown_setting

    ConfigStore.instance().store(group="adapter", name="scale_for_test", node={"name": "scale_for_test", "init_scale": 1.0})
    assert unknown_setting(["adapter=scale_for_test", "adapter.init_scale=0.5"], "federate") is None
    assert "did you mean adapter.init_scale?" in unknown_setting(["adapter=scale_for_test", "adapter.init_scal=0.5"], "federate")


def test_flwr_runs_overrides_take_known_settings_only():
    from federate.flower.task import settings_from_run_config

    with pytest.raises(ConfigError, match=r"bad run config overrides \(\+lrr is not a setting of federate; did you mean lr\?\)"):
        settings_from_run_config({"overrides": "rounds=2 +lrr=1e-3"})
    assert settings_from_run_config({"overrides": "rounds=2 lr=1e-3"})[0].lr == 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("command, argv, message", [
    ("federate", ["lrr=1e-3"], "lrr is not a setting of federate; did you mean lr?"),
    ("extract", ["dataset=demo", "+overwrit=true"], "+overwrit is not a setting of extract; did you mean overwrite?"),
])
def test_cli_unknown_setting_is_one_line_and_exit_2(command, argv, message, tmp_path):
    line = one_error_line(run_cli(command, *argv, cwd=tmp_path))
    assert line.endswith(message)
    assert not (tmp_path / "outputs").exists()


def test_without_its_configs_the_entry_point_says_how_to_install(monkeypatch, tmp_path, capsys):
    from federate import cli

    monkeypatch.setattr(cli, "CONF_DIR", tmp_path / "conf")
    monkeypatch.setattr(sys, "argv", ["federate"])
    with pytest.raises(SystemExit) as e:
        cli.exit_on_bad_override(("dataset",), (), "federate")
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"[federate][ERROR] - fedclip's configs are not at {tmp_path / 'conf'}; "
                                       "install fedclip from its clone with pip install -e .\n")


def test_the_batched_launcher_composes_without_hydras_schema_warning():
    from hydra import compose, initialize_config_dir

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Hydra's deprecation notices are warnings
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("federate", ["hydra/launcher=batched", "hydra.launcher.group_size=3"], return_hydra_config=True)
    assert cfg.hydra.launcher.group_size == 3 and cfg.hydra.launcher._target_.endswith("BatchedLauncher")


# settings that cannot work -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["seed=-1"], "seed must be an integer from 0 to 2^63 - 1, not -1"),
    ([f"seed={2**63}"], f"seed must be an integer from 0 to 2^63 - 1, not {2**63}"),
    ([f"seed={2**64}"], "seed must be an integer from 0 to 2^63 - 1"),
    (["adapter=clip_adapter", "adapter.reduction=0"], "adapter.reduction must be >= 1"),
    (["adapter=clip_adapter", "adapter.reduction=1000"], "adapter.reduction=1000 leaves no hidden unit"),
    (["adapter=clip_adapter", "adapter.ratio=nan"], "adapter.ratio must be in [0, 1]"),
    (["adapter=clip_adapter", "adapter.ratio=inf"], "adapter.ratio must be in [0, 1]"),
    (["flower.min_clients=0"], "flower.min_clients must be >= 1, not 0"),
    (["flower.round_timeout=0"], "flower.round_timeout must be > 0 seconds"),
    (["flower.startup_timeout=-1"], "flower.startup_timeout must be > 0 seconds"),
    (["method=fedprox", "method.mu=nan"], "method.mu must be >= 0 and finite, not nan"),
    (["method=fedprox", "method.mu=inf"], "method.mu must be >= 0 and finite, not inf"),
    (["strategy=fedavgm", "strategy.server_lr=0"], "strategy.server_lr must be > 0 and finite, not 0.0"),
    (["strategy=fedavgm", "strategy.momentum=1"], "strategy.momentum must be in [0, 1), not 1.0"),
    (["strategy=fedadam", "strategy.server_lr=-1"], "strategy.server_lr must be > 0 and finite"),
    (["strategy=fedadam", "strategy.beta1=1"], "strategy.beta1 must be in [0, 1), not 1.0"),
    (["strategy=fedadam", "strategy.beta2=nan"], "strategy.beta2 must be in [0, 1), not nan"),
    (["strategy=fedadam", "strategy.tau=0"], "strategy.tau must be > 0 and finite"),
])
def test_settings_that_cannot_work_are_one_line_errors_before_any_round(planted_cache, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        run_federate(planted_cache, tmp_path, *overrides)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "history.jsonl").exists()


@pytest.mark.parametrize("template, message", [
    ("a photo", "has no field where it needs exactly one {} for the class name"),
    ("a {} of a {}", "has 2 fields ({}, {})"),
    ("a picture of a {name}", "has {name} where"),
    ("a picture of a {0}", "has {0} where"),
    ("a picture of a {:>9}", "has {:>9} where"),
    ("a picture of a {", "is malformed"),
])
def test_a_prompt_template_takes_the_class_name_through_exactly_one_field(template, message):
    from extract.config import template_problem

    assert message in template_problem(template)
    assert template_problem("a {{literal}} picture of a {}") is None


def test_extract_refuses_a_bad_template_in_one_line(tmp_path):
    from extract.errors import ExtractError
    from extract.pipeline import check_settings

    cfg = config("extract", ["dataset=demo", "prompt_templates=['a picture of a {}','a {} and a {}']"])
    with pytest.raises(ExtractError, match=re.escape("prompt template 'a {} and a {}' has 2 fields")):
        check_settings(cfg)


def test_a_run_whose_weights_explode_is_stopped_not_reported(planted_cache, tmp_path):
    """lr=1e3 keeps the losses finite but drives the adapter's weights to hundreds: accuracy at chance."""
    with pytest.raises(ConfigError, match=r"round 1: training diverged \(exploding weights"):
        run_federate(planted_cache, tmp_path, "lr=1e3", rounds=3)
    assert not (tmp_path / "summary.json").exists()


# Ctrl-C ------------------------------------------------------------------------------------------------------

INTERRUPT = """
import sys
import {package}.__main__ as entry
from {package} import {module} as step
def stop(*args, **kwargs):
    raise KeyboardInterrupt
setattr(step, "{function}", stop)
sys.argv = ["{package}", *sys.argv[1:]]
entry.main()
"""


def interrupted(tmp_path, package, module, function, *argv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    code = INTERRUPT.format(package=package, module=module, function=function)
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


@pytest.mark.slow
def test_ctrl_c_in_a_federate_run_is_one_line(planted_cache, tmp_path):
    proc = interrupted(tmp_path, "federate", "federation", "check_finite", f"cache_file={planted_cache}",
                       "model.name=fedclip/planted", "target_domain=target", f"hydra.run.dir={tmp_path}/o")
    line = one_error_line(proc, status=130)
    assert "interrupted after round 0 of 200; resume with: python -m federate " in line
    assert f"hydra.run.dir={tmp_path}/o" in line


@pytest.mark.slow
def test_ctrl_c_in_an_extraction_is_one_line_saying_how_to_resume(image_root, tiny_model, tmp_path):
    proc = interrupted(tmp_path, "extract", "pipeline", "image_embeddings", "dataset=folder",
                       f"dataset.root={image_root}", f"model.name={tiny_model}", f"cache_dir={tmp_path}/cache",
                       "num_workers=0")
    line = one_error_line(proc, status=130)
    assert "interrupted (Ctrl-C): " in line and line.endswith("keeps what was done; re-run the same command to resume")


# output folders --------------------------------------------------------------------------------------------

def cli_run(cache, tmp_path, *overrides):
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's flags go before the overrides
    return run_cli("federate", *flags, f"cache_file={cache}", "model.name=fedclip/planted", "target_domain=target",
                   "rounds=1", *(o for o in overrides if not o.startswith("-")), cwd=tmp_path)


@pytest.mark.slow
def test_a_run_refused_for_a_finished_runs_folder_leaves_its_hydra_files_alone(planted_cache, tmp_path):
    out = tmp_path / "done"
    (out / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml", "summary.json"):  # as a finished run left them
        (out / (".hydra/" if name.endswith("yaml") else "") / name).write_text(f"the finished run's {name}")
    line = one_error_line(cli_run(planted_cache, tmp_path, f"hydra.run.dir={out}", "seed=7"))
    assert f"{out} already holds a run (summary.json)" in line
    assert {p.name: p.read_text() for p in (out / ".hydra").iterdir()} == {
        n: f"the finished run's {n}" for n in ("config.yaml", "hydra.yaml", "overrides.yaml")}


def test_a_sweep_into_a_folder_holding_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    (tmp_path / "sweep" / "0" / "history.jsonl").write_text("")
    with pytest.raises(SystemExit) as e:
        FederateErrors().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}}))
    assert e.value.code == 2
    assert f"{tmp_path}/sweep already holds a run (0/history.jsonl)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_refused_run_takes_away_the_folder_it_made_and_no_other(planted_cache, tmp_path):
    one_error_line(cli_run(planted_cache, tmp_path, f"hydra.run.dir={tmp_path}/new/run", "seed=-1"))
    assert not (tmp_path / "new").exists()


def test_a_folder_the_run_did_not_make_or_holding_more_stays(tmp_path):
    from federate.callbacks import remove_unused_run_folder

    mine = tmp_path / "mine"
    (mine / ".hydra").mkdir(parents=True)
    (mine / "federate.log").write_text("")
    remove_unused_run_folder(mine)  # not made by this process
    assert (mine / "federate.log").exists()
    cfg = OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path / "made")}}})
    FederateErrors().on_run_start(cfg)
    (tmp_path / "made" / "splits.json").write_text("{}")  # the run wrote something: it was not refused at once
    remove_unused_run_folder(tmp_path / "made")
    assert (tmp_path / "made" / "splits.json").exists()


@pytest.mark.slow
def test_every_readme_command_runs_on_the_demo_or_says_in_one_line_what_it_needs(tmp_path):
    """The README's commands, in a fresh folder with only the demo's cache: those written for the demo run;
    those for PACS or a local folder stop in one line that names what they need (a cache and the command
    that builds it, a folder, a model), never a traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    def run(command):
        argv = [sys.executable, *shlex.split(command)[1:]]
        return subprocess.run(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=300)

    extract = README.splitlines()[3].split(" && ")[2]  # the install line's extraction of the demo
    assert extract == "python -m extract dataset=demo model=tiny_random" and run(extract).returncode == 0
    # each stops at once (its time is its imports), two at a time, each in a run folder of its own (Hydra's
    # default is named by the second)
    refused = [c.replace("python -m federate", "python -m federate rounds=1", 1) + f" hydra.run.dir=outputs/{i}"
               for i, c in enumerate(readme_commands("**Federate**") + readme_commands("**Extract a cache**"))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(run, refused))
    for command, proc in zip(refused, procs):
        assert proc.returncode == 2 and "Traceback" not in proc.stdout, (command, proc.stdout)
        lines = [line for line in proc.stdout.splitlines() if "[ERROR]" in line]
        assert len(lines) == 1, (command, proc.stdout)
    for command in readme_commands("On the demo:"):
        if "federate.report" in command:
            folder = next((tmp_path / "outputs" / "multirun").iterdir())
            command = command.replace("outputs/multirun/<the sweep's folder>", str(folder))
        proc = run(command.replace("rounds=20", "rounds=2"))
        assert proc.returncode == 0, (command, proc.stdout)
        if command.startswith("python -m federate -m"):
            assert "jobs finished in" in proc.stdout and "python -m federate.report" in proc.stdout
