"""Runs that cannot silently give wrong numbers: bad split files and split sizes, failed sweep points and
unwritable outputs are one-line errors; a sweep goes on past a bad point and says which points failed."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import config, run_cli
from omegaconf import OmegaConf
from planted import planted, write_cache

from federate.callbacks import FederateErrors
from federate.errors import ConfigError
from federate.splits import check_split_sizes, read_split_file, split_indices, splits_to_ids

# Until conf/federate.yaml registers the callback; `++` also works once it does.
CALLBACK = "++hydra.callbacks.federate_errors._target_=federate.callbacks.FederateErrors"
SIZES = {"alpha": 30, "beta": 20, "target": 20}


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    domains, text = planted(SIZES)
    return write_cache(tmp_path_factory.mktemp("cache") / "planted.h5", domains, text)


def ids(domain: str, rows) -> list[str]:
    return [f"{domain}/{i:05d}" for i in rows]  # planted.write_cache's ids


def good_split() -> dict:
    return {d: {"train": ids(d, range(0, 12)), "val": ids(d, range(12, 16)), "test": ids(d, range(16, 20))}
            for d in ("alpha", "beta")}


IDS_OF = {d: tuple(ids(d, range(n))) for d, n in SIZES.items()}


def write_split(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def cli(cache_file, tmp_path, *overrides):
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's flags go before the overrides
    overrides = [o for o in overrides if not o.startswith("-")]
    return run_cli("federate", *flags, f"cache_file={cache_file}", "model.name=fedclip/planted", "target_domain=target",
                   "rounds=2", "lr=1e-3", *overrides, cwd=tmp_path)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "[ERROR]" in line]


def assert_one_line_error(proc, *fragments, status=2):
    """Exit status, no traceback, exactly one error line, last in the output, holding every fragment."""
    assert proc.returncode == status, proc.stdout
    assert "Traceback" not in proc.stdout, proc.stdout
    errors = error_lines(proc.stdout)
    assert len(errors) == 1 and proc.stdout.strip().splitlines()[-1] == errors[0], proc.stdout
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# check_split_sizes ----------------------------------------------------------------------------------------

def test_split_sizes_that_give_real_numbers_pass():
    check_split_sizes("beta", {"train": 2, "val": 1, "test": 1})
    check_split_sizes("beta", {"train": 156, "val": 52, "test": 52})


@pytest.mark.parametrize("sizes, message", [
    ({"train": 12, "val": 0, "test": 3}, "domain beta has an empty val split (train 12, val 0, test 3): "),
    ({"train": 12, "val": 3, "test": 0}, "domain beta has an empty test split (train 12, val 3, test 0): "),
    ({"train": 1, "val": 3, "test": 3}, "domain beta has 1 training row (train 1, val 3, test 3): "),
    ({"train": 0, "val": 0, "test": 0},
     "domain beta has 0 training rows, an empty val split and an empty test split (train 0, val 0, test 0): "),
    ({"train": 12, "test": 3}, "domain beta has an empty val split (train 12, val 0, test 3): "),
])
def test_split_sizes_that_would_read_as_zero_accuracy_are_refused(sizes, message):
    with pytest.raises(ConfigError) as e:
        check_split_sizes("beta", sizes)
    text = str(e.value)
    assert text.startswith(message) and "\n" not in text
    assert "use a larger domain" in text and "a split_file that lists train, val and test ids" in text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_seeded_split_of_a_tiny_domain_is_refused(seed):
    for n in range(5):  # 0-4 rows: fewer than 2 training rows, or an empty val and test split
        sizes = {p: len(v) for p, v in split_indices(n, seed, "tiny").items()}
        with pytest.raises(ConfigError, match=r"domain tiny has .*\(train \d, val 0, test 0\)"):
            check_split_sizes("tiny", sizes)
    for n in (5, 6, 9, 50):
        check_split_sizes("tiny", {p: len(v) for p, v in split_indices(n, seed, "tiny").items()})


# read_split_file ------------------------------------------------------------------------------------------

def test_a_good_split_file_reads_back_as_indices(tmp_path):
    path = write_split(tmp_path / "s.json", good_split())
    out = read_split_file(path, IDS_OF, ["alpha", "beta"])
    assert out["beta"]["val"].tolist() == [12, 13, 14, 15] and out["alpha"]["train"].dtype == np.int64
    assert splits_to_ids(out, IDS_OF) == good_split()


def with_change(domain, part, value):
    data = good_split()
    data[domain][part] = value
    return data


BAD_SPLITS = {
    "overlap": (with_change("beta", "test", ids("beta", [3, 16, 17])),
                ["domain beta, parts train and test share 1 id(s), e.g. 'beta/00003'"]),
    "repeated id": (with_change("alpha", "val", ids("alpha", [12, 13, 13, 14])),
                    ["domain alpha, part val repeats 1 id(s), e.g. 'alpha/00013' (2 times)"]),
    "not an object": ([["alpha/00000"]], ["must be a JSON object", "not a JSON array"]),
    "domain not an object": ({"alpha": ids("alpha", range(20)), "beta": good_split()["beta"]},
                             ["domain alpha must map to", "not a JSON array"]),
    "part not a list": (with_change("beta", "train", "beta/00000"),
                        ["domain beta, part train must be a list of id strings, not a JSON string"]),
    "ids not strings": (with_change("alpha", "test", [16, 17]),
                        ["domain alpha, part test must list id strings, but has 16 (a JSON number)"]),
    "unknown part": ({**good_split(), "beta": {**good_split()["beta"], "valid": []}},
                     ["domain beta has the unknown part(s) 'valid'; the parts are train, val, test"]),
    "no val": ({**good_split(), "beta": {"train": ids("beta", range(12)), "test": ids("beta", range(16, 20))}},
               ["domain beta has no val part (train 12, val 0, test 4)"]),
    "empty test": (with_change("alpha", "test", []),
                   ["domain alpha has an empty test split (train 12, val 4, test 0)"]),
    "unknown id": (with_change("alpha", "val", ids("beta", [12])),
                   ["domain alpha, part val: 1 ids are not ids of domain alpha in the cache, e.g. 'beta/00012'"]),
    "missing domain": ({"alpha": good_split()["alpha"]}, ["has no split for domain beta (it has alpha)"]),
}


@pytest.mark.parametrize("case", list(BAD_SPLITS))
def test_bad_split_files_are_refused_in_one_line_naming_the_file_domain_and_part(tmp_path, case):
    data, fragments = BAD_SPLITS[case]
    path = write_split(tmp_path / "bad.json", data)
    with pytest.raises(ConfigError) as e:
        read_split_file(path, IDS_OF, ["alpha", "beta"])
    text = str(e.value)
    assert f"split_file {path}" in text and "\n" not in text
    for fragment in fragments:
        assert fragment in text, text


@pytest.mark.slow
def test_cli_split_file_without_val_is_one_line_and_exit_2(cache_file, tmp_path):
    data, fragments = BAD_SPLITS["no val"]
    path = write_split(tmp_path / "bad.json", data)
    proc = cli(cache_file, tmp_path, f"split_file={path}", f"hydra.run.dir={tmp_path}/run")
    assert_one_line_error(proc, f"split_file {path}", *fragments)
    assert not (tmp_path / "run" / "summary.json").exists()


CLI_CASES = ["overlap", "repeated id", "ids not strings", "no val"]


@pytest.mark.slow
def test_cli_sweep_over_bad_split_files_ends_each_job_with_its_one_line_error(cache_file, tmp_path):
    paths = [write_split(tmp_path / f"bad{i}.json", BAD_SPLITS[case][0]) for i, case in enumerate(CLI_CASES)]
    sweep = tmp_path / "sweep"
    proc = cli(cache_file, tmp_path, "-m", f"split_file={','.join(paths)}", f"hydra.sweep.dir={sweep}", CALLBACK)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout
    assert len(error_lines(proc.stdout)) == len(CLI_CASES) + 1, proc.stdout
    assert f"{len(CLI_CASES)} of {len(CLI_CASES)} jobs of the sweep failed" in proc.stdout.strip().splitlines()[-1]
    for job, (case, path) in enumerate(zip(CLI_CASES, paths)):
        last = (sweep / str(job) / "federate.log").read_text().strip().splitlines()[-1]
        assert f"[federate][ERROR] - split_file {path}" in last, last
        for fragment in BAD_SPLITS[case][1]:
            assert fragment in last, last


# the runner ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, sizes", [(3, "(train 1, val 0, test 0)"), (4, "(train 2, val 0, test 0)")])
def test_a_tiny_domain_is_refused_rather_than_scored_zero(tmp_path, rows, sizes):
    """Needs the runner to call check_split_sizes for every participant."""
    from federate.run import run

    domains, text = planted({"alpha": 30, "tiny": rows, "target": 20})
    path = write_cache(tmp_path / "tiny.h5", domains, text)
    cfg = config("federate", [f"cache_file={path}", "model.name=fedclip/planted", "target_domain=target",
                              "rounds=2", "lr=1e-3"])
    with pytest.raises(ConfigError, match=re.escape(f"an empty val split and an empty test split {sizes}")):
        run(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "summary.json").exists()


# sweeps ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_sweep_goes_on_past_a_bad_point_and_exits_non_zero(cache_file, tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(cache_file, tmp_path, "-m", "lr=1e-3,-1,1e-3", f"hydra.sweep.dir={sweep}", CALLBACK)
    assert proc.returncode == 1, proc.stdout
    assert "Traceback" not in proc.stdout
    # the good points before and after the bad one ran to the end
    assert [json.loads((sweep / j / "summary.json").read_text())["lr"] for j in ("0", "2")] == [1e-3, 1e-3]
    assert not (sweep / "1" / "summary.json").exists()
    # the failed job's log ends with its one-line error
    last = (sweep / "1" / "federate.log").read_text().strip().splitlines()[-1]
    assert re.search(r"\[federate\]\[ERROR\] - lr must be > 0.*, not -1", last), last
    # the sweep's last line says how many jobs failed and where
    end = proc.stdout.strip().splitlines()[-1]
    assert "1 of 3 jobs of the sweep failed" in end and f"{sweep / '1'} (lr=-1" in end, proc.stdout
    report = run_cli("federate.report", "--no-plots", str(sweep), cwd=tmp_path)
    assert report.returncode == 0, report.stdout
    assert "2 runs with a summary." in report.stdout
    assert f"{sweep / '1'}: no summary.json (failed or unfinished)" in report.stdout
    assert re.search(f"{re.escape(str(sweep / '1'))}: no summary.json .*lr must be > 0", report.stdout)


@pytest.mark.slow
def test_cli_sweep_into_a_folder_under_a_file_is_one_line(cache_file, tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = cli(cache_file, tmp_path, "-m", "seed=0,1", f"hydra.sweep.dir={tmp_path}/a_file/sweep", CALLBACK)
    assert_one_line_error(proc, f"cannot write the output folder {tmp_path}/a_file/sweep",
                          f"{tmp_path}/a_file is a file, not a folder", "set hydra.sweep.dir=")


# unwritable outputs -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_output_folder_under_a_file_is_one_line_and_exit_2(cache_file, tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = cli(cache_file, tmp_path, f"hydra.run.dir={tmp_path}/a_file/run", CALLBACK)
    assert_one_line_error(proc, f"cannot write the output folder {tmp_path}/a_file/run",
                          f"{tmp_path}/a_file is a file, not a folder", "set hydra.run.dir=")
    assert (tmp_path / "a_file").read_text() == ""


@pytest.mark.parametrize("folder", ["a_file", "a_file/run", "a_file/run/deeper"])
def test_an_output_folder_that_is_or_lies_under_a_file_is_refused(tmp_path, capsys, folder):
    (tmp_path / "a_file").write_text("")
    cfg = OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path / folder)}}})
    with pytest.raises(SystemExit) as e:
        FederateErrors().on_run_start(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"[federate][ERROR] - cannot write the output folder {tmp_path / folder}: {tmp_path}/a_file is a "
                   f"file, not a folder; set hydra.run.dir=<a folder you can write>\n")


def test_a_writable_output_folder_passes_and_is_created(tmp_path, capsys):
    cfg = OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path / "new" / "run")}}})
    FederateErrors().on_run_start(cfg)
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_cli_output_file_that_cannot_be_written_is_one_line_and_exit_2(cache_file, tmp_path):
    """Tests run as root, so a folder in place of an output file stands for a file the user cannot write."""
    run_dir = tmp_path / "run"
    for name in ("splits.json", "adapter.safetensors"):  # (the runner refuses a folder with a summary or history)
        (run_dir / name).mkdir(parents=True)
    proc = cli(cache_file, tmp_path, f"hydra.run.dir={run_dir}")
    line = assert_one_line_error(proc, f"{run_dir}/", "exists and is not a regular file", "remove it")
    assert re.search(r"\S+/(splits\.json|adapter\.safetensors) exists and is not a regular file", line)


def test_a_target_without_a_row_of_the_chosen_classes_is_refused(tmp_path):
    """dataset.classes can leave the target domain empty: its accuracy would read 0.00% and pull `overall`
    down; the run is refused instead."""
    import numpy as np
    from conftest import run_federate
    from planted import one_line, planted, write_cache

    from federate.errors import ConfigError

    domains, text = planted({"alpha": 60, "beta": 60, "target": 40})
    x, y = domains["target"]
    domains["target"] = (x, np.where(y < 2, 2, y))  # no row of class0 or class1
    cache = write_cache(tmp_path / "c.h5", domains, text)
    one_line(ConfigError, lambda: run_federate(cache, tmp_path / "run", "dataset.classes=[class0,class1]", rounds=1),
             "the target domain target has no rows of the classes dataset.classes keeps (class0, class1)")
    assert not (tmp_path / "run" / "summary.json").exists()
