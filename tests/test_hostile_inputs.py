"""Hostile and mistaken inputs, each refused in one line (issue 22's medium findings): deeply nested JSON,
split files that are devices, FIFOs or too large, client names that collide once normalised, a full split
file with a class subset, the partition command's settings, ids that are not UTF-8, values of the wrong
type, and the hints for a setting of another option, a group's setting and a domain's case."""
from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import h5py
import pytest
from conftest import run_cli, run_federate
from planted import planted, write_cache

from federate import splits
from federate.errors import ConfigError


@contextmanager
def at_most(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading waits for a writer forever)."""
    def stop(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def one_line(stdout: str, *fragments: str) -> str:
    """The terminal output is one error line (no traceback) holding every fragment."""
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stdout and "[ERROR]" in lines[0], stdout
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture(scope="module")
def published(planted_cache, tmp_path_factory) -> Path:
    """The splits.json of a 1-round run on the planted cache (every class)."""
    out = tmp_path_factory.mktemp("published") / "run"
    run_federate(planted_cache, out, rounds=1)
    return out / "splits.json"


# ---------------------------------------------------------------- split files
def test_a_deeply_nested_split_file_is_one_line(planted_cache, tmp_path):
    path = tmp_path / "splits.json"
    path.write_text('{"alpha": {"train": ' + nested(100_000) + "}}")
    with pytest.raises(ConfigError, match="nested too deeply"):
        run_federate(planted_cache, tmp_path / "run", f"split_file={path}", rounds=1)


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "folder"])
def test_a_split_file_that_is_not_a_regular_file_is_refused_at_once(planted_cache, tmp_path, kind):
    path = Path(kind) if kind.startswith("/") else tmp_path / "splits.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    with at_most(20), pytest.raises(ConfigError, match="splits.json is not a regular file|zero is not a regular file"):
        run_federate(planted_cache, tmp_path / "run", f"split_file={path}", rounds=1)


def test_a_split_file_larger_than_the_bound_is_refused(planted_cache, published, tmp_path, monkeypatch):
    monkeypatch.setattr(splits, "MAX_SPLIT_BYTES", 1000)
    with pytest.raises(ConfigError, match="larger than 1000 bytes"):
        run_federate(planted_cache, tmp_path / "run", f"split_file={published}", rounds=1)


@pytest.mark.parametrize("names", [("beta", "beta "), ("beta/0", "beta /0"), ("alpha", "alpha\t")])
def test_client_names_equal_once_normalised_are_refused(planted_cache, published, tmp_path, names):
    data = json.loads(published.read_text())
    parts = data.pop("beta")
    half = {p: ids[: len(ids) // 2] for p, ids in parts.items()}
    rest = {p: ids[len(ids) // 2:] for p, ids in parts.items()}
    if names[0].startswith("alpha"):
        data[names[1]] = data["alpha"]
        data["beta"] = parts
    else:
        data[names[0]], data[names[1]] = half, rest
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="are one client"):
        run_federate(planted_cache, tmp_path / "run", f"split_file={path}", rounds=1)


def test_a_full_split_file_works_with_a_class_subset(planted_cache, published, tmp_path):
    classes = "dataset.classes=[class0,class1,class2]"
    run_federate(planted_cache, tmp_path / "run", f"split_file={published}", classes, rounds=1)
    full, used = json.loads(published.read_text()), json.loads((tmp_path / "run" / "splits.json").read_text())
    assert used.keys() == full.keys()
    for client in full:
        for part in ("train", "val", "test"):  # the rows of the chosen classes, in the published order
            assert used[client][part] and set(used[client][part]) < set(full[client][part])
            assert used[client][part] == [i for i in full[client][part] if i in set(used[client][part])]
    # an id that is in no class of the cache is still refused
    full["alpha"]["train"].append("alpha/99999")
    (tmp_path / "bad.json").write_text(json.dumps(full))
    with pytest.raises(ConfigError, match="not ids of domain alpha in the cache, e.g. 'alpha/99999'"):
        run_federate(planted_cache, tmp_path / "run2", f"split_file={tmp_path / 'bad.json'}", classes, rounds=1)


# ---------------------------------------------------------------- Flower registration
def test_registration_sizes_nested_too_deeply_or_too_long_are_one_reason():
    from federate.flower.task import check_registration

    why = check_registration({"client": "alpha", "domain": "alpha", "sizes": nested(4000)})
    assert isinstance(why, str) and "nested too deeply" in why
    why = check_registration({"client": "alpha", "domain": "alpha", "sizes": " " * 20_000 + "{}"})
    assert isinstance(why, str) and "characters long" in why
    ok = check_registration({"client": "alpha", "domain": "alpha", "sizes": '{"train": 3, "val": 1, "test": 1}'})
    assert ok == ("alpha", "alpha", {"train": 3, "val": 1, "test": 1})


# ---------------------------------------------------------------- python -m federate.partition
@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("seed=-1", "seed must be an integer from 0 to 2^63 - 1, not -1"),
    ("+foo=1", "+foo is not a setting of federate"),
    ("rounds=abc", "rounds=abc: Value 'abc' of type 'str' could not be converted to Integer"),
])
def test_the_partition_command_refuses_bad_settings_in_one_line(planted_cache, tmp_path, override, message):
    proc = run_cli("federate.partition", str(planted_cache), override, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout
    assert len(proc.stdout.strip().splitlines()) == 1 and message in proc.stdout, proc.stdout
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- python -m extract.info, ids that are not UTF-8
def test_extract_info_lists_ids_that_are_not_utf8(tmp_path):
    from extract.identity import strings_sha256

    path = write_cache(tmp_path / "c.h5", *planted({"a": 20, "b": 20}))
    with h5py.File(path, "a") as f:
        ds = f["domains/a/ids"]
        ds[0] = b"\xff\xfe not utf-8"
        ds.attrs["sha256"] = strings_sha256(ds[()])  # what a writer of such ids would have recorded
    proc = run_cli("extract.info", str(path), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout
    assert "domain a has ids that are not UTF-8 text" in proc.stdout
    with pytest.raises(ConfigError, match="not UTF-8 text"):  # and federate refuses it in one line
        run_federate(path, tmp_path / "run", "target_domain=b", rounds=1)


def test_the_checksum_of_utf8_strings_is_unchanged():
    import hashlib

    from extract.identity import strings_sha256

    assert strings_sha256(["a/1", "é/2"]) == hashlib.sha256("a/1\né/2".encode()).hexdigest()
    assert strings_sha256([b"a/1", "é/2".encode()]) == strings_sha256(["a/1", "é/2"])


# ---------------------------------------------------------------- values of the wrong type: one line, status 2
@pytest.mark.parametrize("command, override, reason", [
    ("federate", "rounds=abc", "rounds=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    pytest.param("federate", "text_adapter=1.5", "text_adapter must be true or false", marks=pytest.mark.slow),
    pytest.param("federate", "flower.min_clients=a", "flower.min_clients=a: Value 'a' of type 'str' could not be "
                 "converted", marks=pytest.mark.slow),
    pytest.param("extract", "batch_size=abc", "batch_size=abc: Value 'abc' of type 'str' could not be converted to "
                 "Integer", marks=pytest.mark.slow),
])
def test_a_value_of_the_wrong_type_is_one_line_and_status_2(tmp_path, command, override, reason):
    proc = run_cli(command, override, f"hydra.run.dir={tmp_path / 'o'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    one_line(proc.stdout, reason)
    assert not (tmp_path / "o").exists()


def test_a_sweep_names_the_point_whose_value_is_wrong():
    from federate.cli import bad_value

    assert bad_value(["-m", "lr=1e-3,abc", "seed=0,1"], "federate").startswith(
        "lr=abc: Value 'abc' of type 'str' could not be converted to Float")
    assert bad_value(["-m", "lr=1e-3,1e-4", "seed=range(0,3)"], "federate") is None


# ---------------------------------------------------------------- hints
@pytest.mark.parametrize("argv, hint", [
    (["partition.alpha=-1"], "partition.alpha is a setting of partition=dirichlet: did you mean partition=dirichlet "
                             "partition.alpha=-1?"),
    (["mu=0.1"], "method.mu is a setting of method=fedprox or method=fedprox_full: did you mean method=fedprox "
                 "method.mu=0.1?"),
    (["method=fedprox", "mu=0.1"], "did you mean method.mu=0.1?"),
    (["server_lr=0.5"], "did you mean strategy=fedadam strategy.server_lr=0.5?"),
    (["n_ctx=4"], "did you mean adapter=coop adapter.n_ctx=4?"),
    (["lrr=1e-3"], "did you mean lr?"),
])
def test_a_setting_of_another_option_or_group_is_named(argv, hint):
    from federate.cli import unknown_setting

    message = unknown_setting(argv, "federate")
    assert message is not None and message.endswith(hint), message


def test_a_target_domain_in_another_case_is_hinted(planted_cache, tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean alpha\? \(names are case-sensitive\)"):
        run_federate(planted_cache, tmp_path / "run", "target_domain=Alpha", rounds=1)


@pytest.mark.slow
def test_the_cli_names_the_group_setting_meant(planted_cache, tmp_path):
    proc = run_cli("federate", f"cache_file={planted_cache}", "model.name=fedclip/planted", "mu=0.1",
                   f"hydra.run.dir={tmp_path / 'o'}", cwd=tmp_path)
    assert proc.returncode == 2
    one_line(proc.stdout, "mu is not a setting of federate; method.mu is a setting of method=fedprox")
