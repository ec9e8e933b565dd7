"""Partitions (federate/partition.py): clients inside domains, their splits, replay and class subsets."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, config, run_cli, run_federate

from federate.cache import load_cache
from federate.errors import ConfigError
from federate.partition import PartitionSettings, make_clients, partition_rows, restrict_classes, splits_json
from federate.splits import PARTS

PARTICIPANTS = ["alpha", "beta", "gamma"]


def clients_of(cache_file, *overrides):
    cfg = config("federate", [f"cache_file={cache_file}", *overrides])
    return make_clients(load_cache(cache_file), PARTICIPANTS, cfg)


def client_rows(c) -> np.ndarray:
    return np.concatenate([c.rows[p] for p in PARTS])


def label_skew(cache, clients) -> float:
    """Mean KL divergence of a client's label distribution from its domain's (0 for identical ones)."""
    total = []
    for c in clients:
        labels = cache.domains[c.domain].labels
        C = len(cache.class_names)
        p = np.bincount(labels[client_rows(c)], minlength=C) / len(client_rows(c))
        q = np.bincount(labels, minlength=C) / len(labels)
        total.append(sum(pi * np.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))
    return float(np.mean(total))


@pytest.mark.parametrize("overrides", [["partition=iid", "partition.clients_per_domain=4"],
                                       ["partition=dirichlet", "partition.alpha=0.3"],
                                       ["partition=shards", "partition.classes_per_client=2"]])
def test_clients_are_disjoint_and_cover_their_domain(planted_cache, overrides):
    cache = load_cache(planted_cache)
    cfg = config("federate", [f"cache_file={planted_cache}", *overrides])
    settings = PartitionSettings.from_config(cfg.partition, len(cache.class_names))
    clients = make_clients(cache, PARTICIPANTS, cfg)
    for d in PARTICIPANTS:
        # the domain's rows, each given to one client (5 clients: every class is some client's first class)
        parts = partition_rows(cache.domains[d].labels, settings, 0, d)
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(cache.domains[d].ids)))
        mine = [c for c in clients if c.domain == d]
        assert [c.name for c in mine] == [f"{d}/{k}" for k in range(settings.clients_per_domain)]
        for c, rows in zip(mine, parts):  # each client splits its rows 60/20/20 (int() of each share)
            n = len(rows)
            assert set(client_rows(c)) <= set(rows) and len(client_rows(c)) == int(0.6 * n) + 2 * int(0.2 * n)
            assert len(c.rows["train"]) >= 2 and len(c.rows["val"]) and len(c.rows["test"])
        used = np.concatenate([client_rows(c) for c in mine])
        assert len(np.unique(used)) == len(used)  # no row in two parts or two clients


def test_label_skew_grows_as_alpha_falls(planted_cache):
    cache = load_cache(planted_cache)
    skew = {a: np.mean([label_skew(cache, clients_of(planted_cache, "partition=dirichlet", f"partition.alpha={a}",
                                                     f"seed={s}")) for s in range(3)])
            for a in (0.1, 1.0, 100.0)}
    iid = label_skew(cache, clients_of(planted_cache, "partition=iid"))
    assert skew[0.1] > skew[1.0] > skew[100.0], skew
    assert skew[0.1] > 0.5 and skew[100.0] < 0.05 and iid < 0.05, (skew, iid)


def test_shards_give_each_client_k_classes(planted_cache):
    cache = load_cache(planted_cache)
    for k in (1, 3):
        clients = clients_of(planted_cache, "partition=shards", f"partition.classes_per_client={k}")
        for c in clients:
            assert len(np.unique(cache.domains[c.domain].labels[client_rows(c)])) == k, c.name


def test_seeds_differ_and_a_seed_repeats(planted_cache):
    cache = load_cache(planted_cache)
    for partition in (["partition=iid"], ["partition=dirichlet"], ["partition=shards"]):
        a, b, c = (splits_json(clients_of(planted_cache, *partition, f"seed={s}"), cache) for s in (0, 0, 1))
        assert a == b and a != c


def test_a_domain_partition_is_the_same_whichever_domain_is_the_target(planted_cache):
    cfg = config("federate", [f"cache_file={planted_cache}", "partition=dirichlet"])
    cache = load_cache(planted_cache)
    one = splits_json(make_clients(cache, ["alpha", "beta"], cfg), cache)
    other = splits_json(make_clients(cache, ["beta", "target"], cfg), cache)
    assert {c: v for c, v in one.items() if c.startswith("beta/")} == \
        {c: v for c, v in other.items() if c.startswith("beta/")}


def test_a_run_writes_the_clients_splits_and_split_file_replays_them(planted_cache, tmp_path):
    a = run_federate(planted_cache, tmp_path / "a", "partition=dirichlet", "partition.clients_per_domain=3",
                     "partition.alpha=0.5", rounds=2)
    written = json.loads((tmp_path / "a" / "splits.json").read_text())
    assert sorted(written) == sorted(f"{d}/{k}" for d in PARTICIPANTS for k in range(3))
    assert sorted(a["clients"]) == sorted(a["personalization"]) == sorted(written)
    assert sorted(a["participants"]) == PARTICIPANTS  # the domains
    # replayed with other partition settings and another seed: the file decides
    run_federate(planted_cache, tmp_path / "b", "seed=7", f"split_file={tmp_path / 'a' / 'splits.json'}", rounds=2)
    assert json.loads((tmp_path / "b" / "splits.json").read_text()) == written


def test_partition_domain_is_unchanged_and_imports_no_datasets(planted_cache):
    cache = load_cache(planted_cache)
    clients = clients_of(planted_cache)
    assert [c.name for c in clients] == PARTICIPANTS and [c.domain for c in clients] == PARTICIPANTS
    from federate.splits import split_indices

    for c in clients:
        expected = split_indices(len(cache.domains[c.domain].ids), 0, c.domain)
        assert all((c.rows[p] == expected[p]).all() for p in PARTS)
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); from conftest import config; "
            "from federate.cache import load_cache; from federate.partition import make_clients; "
            f"make_clients(load_cache({str(planted_cache)!r}), ['alpha'], config('federate', ['seed=0'])); "
            "assert 'datasets' not in sys.modules and 'flwr_datasets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})


BAD_SETTINGS = {
    "no clients": (["partition=iid", "partition.clients_per_domain=0"], "partition.clients_per_domain must be >= 1"),
    "not an integer": (["partition=iid", "partition.clients_per_domain=two"], "must be an integer, not 'two'"),
    "alpha 0": (["partition=dirichlet", "partition.alpha=0"], "partition.alpha must be > 0 and finite"),
    "alpha nan": (["partition=dirichlet", "partition.alpha=nan"], "partition.alpha must be > 0 and finite"),
    "alpha inf": (["partition=dirichlet", "partition.alpha=inf"], "partition.alpha must be > 0 and finite"),
    "min_rows": (["partition=dirichlet", "partition.min_rows=3"], "partition.min_rows must be >= 5"),
    "impossible min_rows": (["partition=dirichlet", "partition.min_rows=40"],
                            "domain gamma has 150 rows, too few for 5 clients of at least 40 rows each"),
    "k 0": (["partition=shards", "partition.classes_per_client=0"], "classes_per_client must be in 1..5"),
    "k too many": (["partition=shards", "partition.classes_per_client=6"], "classes_per_client must be in 1..5"),
    "small domain": (["partition=iid", "partition.clients_per_domain=40"],
                     "domain gamma has 150 rows, too few for 40 clients of at least 5 rows each"),
    "unknown": (["partition.name=halves"], "partition must be one of domain, iid, dirichlet, shards"),
    "no draw fits": (["partition=dirichlet", "partition.alpha=0.01", "partition.min_rows=25"],
                     "into 5 clients: The max number of attempts (10) was reached; raise partition.alpha"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_partition_settings_are_one_line(planted_cache, case):
    overrides, fragment = BAD_SETTINGS[case]
    with pytest.raises(ConfigError) as e:
        clients_of(planted_cache, *overrides)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def bad_split(planted_cache, tmp_path, change):
    cache = load_cache(planted_cache)
    data = splits_json(clients_of(planted_cache, "partition=iid", "partition.clients_per_domain=2"), cache)
    change(data)
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        clients_of(planted_cache, f"split_file={path}")
    assert "\n" not in str(e.value) and f"split_file {path}" in str(e.value)
    return str(e.value)


def test_split_files_of_clients_are_checked(planted_cache, tmp_path):
    def overlap(data):
        data["beta/1"]["val"].append(data["beta/0"]["train"][0])

    assert "clients beta/0 (train) and beta/1 (val) of domain beta share 1 id(s)" in \
        bad_split(planted_cache, tmp_path, overlap)
    assert "'delta/0' is not a client of a domain of the cache" in \
        bad_split(planted_cache, tmp_path, lambda d: d.update({"delta/0": d.pop("beta/0")}))
    assert "'beta/x' is not a client" in bad_split(planted_cache, tmp_path, lambda d: d.update({"beta/x": d.pop("beta/0")}))

    def foreign(data):
        data["beta/1"]["test"].append("alpha/00001")

    assert "client beta/1, part test: 1 ids are not ids of domain beta" in bad_split(planted_cache, tmp_path, foreign)

    def no_gamma(data):
        for k in ("gamma/0", "gamma/1"):
            del data[k]

    assert "has no split for domain gamma" in bad_split(planted_cache, tmp_path, no_gamma)
    # a target domain's clients are no participants: they are left out, as before
    cache = load_cache(planted_cache)
    data = splits_json(clients_of(planted_cache, "partition=iid", "partition.clients_per_domain=2"), cache)
    data["target/0"] = {"train": ["target/00000", "target/00001"], "val": ["target/00002"], "test": ["target/00003"]}
    (tmp_path / "t.json").write_text(json.dumps(data))
    assert [c.name for c in clients_of(planted_cache, f"split_file={tmp_path / 't.json'}")] == \
        [f"{d}/{k}" for d in PARTICIPANTS for k in range(2)]


def test_the_domain_runners_refuse_a_split_file_of_several_clients_per_domain(planted_cache, tmp_path):
    from federate.splits import read_split_file

    cache = load_cache(planted_cache)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(splits_json(clients_of(planted_cache, "partition=iid"), cache)))
    with pytest.raises(ConfigError, match="splits domain alpha into clients .* keeps one client per domain"):
        read_split_file(path, {d: cache.domains[d].ids for d in PARTICIPANTS}, PARTICIPANTS)


# class subsets ----------------------------------------------------------------------------------------------

def test_restrict_classes_keeps_the_rows_and_prompts_of_the_subset(planted_cache):
    cache = load_cache(planted_cache)
    sub = restrict_classes(cache, ["class3", "class1"])
    assert sub.class_names == ("class3", "class1") and sub.text.shape[1] == 2
    assert np.array_equal(sub.text[:, 0], cache.text[:, 3])
    for d, data in sub.domains.items():
        old = cache.domains[d]
        keep = np.isin(old.labels, [3, 1])
        assert data.ids == tuple(np.array(old.ids)[keep]) and set(data.labels.tolist()) <= {0, 1}
        assert np.array_equal(data.labels, np.where(old.labels[keep] == 3, 0, 1))
    assert restrict_classes(cache, None) is cache
    for bad, fragment in ((["class1", "nope"], "'nope' is not a class of"), (["class1"], "at least 2 distinct"),
                          (["class1", "class1"], "at least 2 distinct")):
        with pytest.raises(ConfigError, match=fragment):
            restrict_classes(cache, bad)


@pytest.mark.slow
def test_federate_runs_on_a_class_subset_and_by_default_on_every_class(planted_cache, tmp_path):
    common = [f"cache_file={planted_cache}", "model.name=fedclip/planted", "target_domain=target", "rounds=2",
              "lr=1e-3"]  # the default dataset=pacs lists 7 other class names: federate must not use them
    proc = run_cli("federate", *common, f"hydra.run.dir={tmp_path / 'all'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    proc = run_cli("federate", *common, "dataset.classes=[class4,class0,class2]", f"hydra.run.dir={tmp_path / 'sub'}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    cache = load_cache(planted_cache)
    every = json.loads((tmp_path / "all" / "summary.json").read_text())
    sub = json.loads((tmp_path / "sub" / "summary.json").read_text())
    wanted = np.isin(cache.domains["target"].labels, [4, 0, 2]).sum()
    assert sub["target_size"] == wanted < every["target_size"] == len(cache.domains["target"].ids)
    split = json.loads((tmp_path / "sub" / "splits.json").read_text())
    labels = {i: y for d in PARTICIPANTS for i, y in zip(cache.domains[d].ids, cache.domains[d].labels)}
    assert {labels[i] for parts in split.values() for ids in parts.values() for i in ids} == {0, 2, 4}
    with pytest.raises(ConfigError, match=r"dataset.classes=\['class0', 'dog'\]: 'dog' is not a class of"):
        run_federate(planted_cache, tmp_path / "bad", "dataset.classes=[class0,dog]")


def test_runners_refuse_what_they_would_ignore(planted_cache, tmp_path):
    """The image backbone runs one client per domain; neither it nor Flower restricts the classes."""
    for overrides, fragment in ((["method=fedavg_full", "partition=iid"],
                                 "method=fedavg_full runs one client per domain, not partition=iid"),
                                (["backend=flower", "dataset.classes=[class0,class1]"],
                                 "dataset.classes cannot name a subset")):
        with pytest.raises(ConfigError, match=fragment):
            run_federate(planted_cache, tmp_path / overrides[1], *overrides)


# python -m federate.partition -------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_partition_command_writes_the_label_distribution(planted_cache, tmp_path):
    import csv

    out = tmp_path / "plot"
    proc = run_cli("federate.partition", str(planted_cache), "partition=shards", "partition.classes_per_client=2",
                   "seed=3", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    rows = list(csv.DictReader(open(out / "label_distribution.csv")))
    cache = load_cache(planted_cache)
    expected = {c.name: c for c in make_clients(cache, list(cache.domains), config(
        "federate", [f"cache_file={planted_cache}", "partition=shards", "partition.classes_per_client=2", "seed=3"]))}
    assert [r["client"] for r in rows] == list(expected) and len(rows) == 4 * 5
    for r in rows:
        counts = [int(r[f"class{k}"]) for k in range(5)]
        assert sum(c > 0 for c in counts) == 2 and sum(counts) == int(r["rows"]) == len(client_rows(expected[r["client"]]))
    assert (out / "label_distribution.png").read_bytes()[:4] == b"\x89PNG"
    assert "alpha/0" in proc.stdout and "largest class" in proc.stdout
    # its files are never overwritten; a bad option is one line
    again = run_cli("federate.partition", str(planted_cache), "--out", str(out), cwd=tmp_path)
    assert again.returncode == 2 and "label_distribution.csv exists" in again.stdout and "Traceback" not in again.stdout
    bad = run_cli("federate.partition", str(planted_cache), "partition=halves", cwd=tmp_path)
    assert bad.returncode == 2 and "partition=halves is not an option of partition" in bad.stdout
