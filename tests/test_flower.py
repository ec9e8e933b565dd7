"""Flower: the same experiment as the in-process runner, through a fake Grid (fast), Flower's simulation
engine, and a real deployment (SuperLink + 3 SuperNodes on 127.0.0.1) that survives a killed client."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

flwr = pytest.importorskip("flwr", reason="needs Flower: pip install -e '.[flower]'")

import torch  # noqa: E402
from conftest import ROOT, config, outputs, run_cli, same_outputs  # noqa: E402
from flwr.app import Context, MessageType, RecordDict  # noqa: E402
from planted import planted, write_cache  # noqa: E402

from federate.errors import ConfigError  # noqa: E402
from federate.federation import Interrupted  # noqa: E402
from federate.flower.client_app import evaluate as client_evaluate  # noqa: E402
from federate.flower.client_app import query as client_query  # noqa: E402
from federate.flower.client_app import train as client_train  # noqa: E402
from federate.flower.server_app import serve  # noqa: E402
from federate.flower.task import check_update, ship  # noqa: E402
from federate.run import run  # noqa: E402

DOMAINS = {"alpha": 120, "beta": 100, "gamma": 90, "target": 80}
PARTICIPANTS = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    domains, text = planted(DOMAINS)
    return write_cache(tmp_path_factory.mktemp("flower") / "planted.h5", domains, text)


def flower_cfg(cache_file, out, *extra):
    return config("federate", [f"cache_file={cache_file}", "model.name=fedclip/planted", "target_domain=target",
                               "rounds=3", "lr=1e-3", "flower.round_timeout=30", "flower.startup_timeout=10", *extra])


def in_process(cache_file, out, rounds=3, *overrides):
    cfg = config("federate", [f"cache_file={cache_file}", "model.name=fedclip/planted", "target_domain=target",
                              f"rounds={rounds}", "lr=1e-3", *overrides])
    return run(cfg, out)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages made outside a Flower runtime need the identity the runtime would set."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class FakeGrid:
    """Delivers each message to the real ClientApp handlers in this process. `tamper(domain, round, kind,
    reply)` may alter a reply or return None (the client does not answer)."""

    def __init__(self, tamper=None, node_order=PARTICIPANTS):
        self.nodes = {101 + i: d for i, d in enumerate(node_order)}
        self.states = {n: RecordDict() for n in self.nodes}  # each node's context state, kept as Flower keeps it
        self.tamper = tamper

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=node, node_config={"partition": self.nodes[node]}, state=self.states[node],
                          run_config={})
            kind = m.metadata.message_type
            reply = {MessageType.TRAIN: client_train, MessageType.EVALUATE: client_evaluate,
                     MessageType.QUERY: client_query}[kind](m, ctx)
            if self.tamper:
                round_ = m.content["config"]["round"]  # (a name in the method's exchange after the rounds)
                reply = self.tamper(self.nodes[node], round_ if isinstance(round_, str) else int(round_), kind, reply)
            if reply is not None:
                replies.append(reply)
        return replies


def same_results(a: dict, b: dict, tol=1e-6):
    assert a["best_round"] == b["best_round"]
    assert a["generalization"] == pytest.approx(b["generalization"], abs=tol)
    assert a["val_mean"] == pytest.approx(b["val_mean"], abs=tol)
    assert a["personalization"].keys() == b["personalization"].keys()
    for d in a["personalization"]:
        assert a["personalization"][d] == pytest.approx(b["personalization"][d], abs=tol)


def test_the_flower_apps_reproduce_the_in_process_runner(cache_file, tmp_path):
    flower = serve(FakeGrid(), flower_cfg(cache_file, tmp_path / "f"), tmp_path / "f")
    local = in_process(cache_file, tmp_path / "l")
    same_results(flower, local)
    assert flower["backend"] == "flower" and flower["bytes_per_round"] == local["bytes_per_round"]
    for name in ("summary.json", "history.jsonl", "adapter.safetensors"):
        assert (tmp_path / "f" / name).exists()
    same_splits(tmp_path / "f", tmp_path / "l")


@pytest.mark.parametrize("method", ["fedper", "fedrep", "fedbabu", "fedrod", "ditto", "apfl"])
def test_the_flower_apps_run_a_personal_method_as_the_in_process_runner(cache_file, tmp_path, method):
    """Each client keeps its personal state (its head, its model) in its node's context; the server sees
    only the shared part, and the numbers equal the in-process run's."""
    flower = serve(FakeGrid(), flower_cfg(cache_file, tmp_path / "f", f"method={method}"), tmp_path / "f")
    local = in_process(cache_file, tmp_path / "l", 3, f"method={method}")
    same_results(flower, local)
    assert flower["bytes_per_round"] == local["bytes_per_round"] and flower["personal_params"] == local["personal_params"]
    from safetensors.torch import load_file

    shared = load_file(tmp_path / "f" / "adapter.safetensors")
    assert set(shared) == {k for k in load_file(tmp_path / "l" / "adapter.safetensors") if "/" not in k}


@pytest.mark.parametrize("method", ["fedproto", "ccvr", "fedpft"])
def test_the_flower_apps_run_a_statistics_method_as_the_in_process_runner(cache_file, tmp_path, method):
    """Clients that send statistics of their features (prototypes, class moments in CCVR's calibration after
    the rounds, float16 mixtures) over Flower: checked against what the method says a client sends, and the
    numbers equal the in-process run's."""
    extra = {"fedpft": ["method.head_epochs=5"], "fedproto": ["target_domain=none"]}.get(method, [])
    nodes = [*PARTICIPANTS, "target"] if method == "fedproto" else PARTICIPANTS  # (no target: every domain a client)
    flower = serve(FakeGrid(node_order=nodes), flower_cfg(cache_file, tmp_path / "f", f"method={method}", *extra),
                   tmp_path / "f")
    local = in_process(cache_file, tmp_path / "l", 3, f"method={method}", *extra)
    same_results(flower, local)
    if method == "ccvr":
        same_results(flower["before_calibration"], local["before_calibration"])
    for key in ("bytes_per_round", "bytes_total", "rounds", "personal_params"):
        assert flower[key] == local[key], key


@pytest.mark.parametrize("method", ["fedproto", "ccvr", "fedpft"])
def test_hundreds_of_rows_per_class_are_counts_not_exploded_weights(tmp_path, method):
    """A client's rows per class (what the statistics methods send beside their statistics) are counts: a
    client of 400 training rows in 2 classes sends about 200 per class, which no weight ever is, and is
    not dropped for it."""
    domains, text = planted({"alpha": 700, "beta": 650, "gamma": 600, "target": 80}, classes=2)
    cache = write_cache(tmp_path / "big.h5", domains, text)
    extra = {"fedpft": ["method.head_epochs=1"], "fedproto": ["target_domain=none"]}.get(method, [])
    nodes = [*PARTICIPANTS, "target"] if method == "fedproto" else PARTICIPANTS
    flower = serve(FakeGrid(node_order=nodes), flower_cfg(cache, tmp_path / "f", f"method={method}", "rounds=1",
                                                            *extra), tmp_path / "f")
    assert "dropped_clients" not in flower or not flower["dropped_clients"], flower["dropped_clients"]
    same_results(flower, in_process(cache, tmp_path / "l", 1, f"method={method}", *extra))


@pytest.mark.parametrize("method, key", [("ccvr", "ccvr.count"), ("fedproto", "proto.count"),
                                         ("fedpft", "gmm.count")])
@pytest.mark.parametrize("count", [1e6, -3.0])
def test_a_client_that_inflates_its_rows_per_class_is_dropped(cache_file, tmp_path, method, key, count):
    """Rows per class weigh a client's statistics in the server's pooling: beta claims more rows than its
    training split holds (or fewer than none), and takes no further part."""
    from flwr.app import ArrayRecord

    def inflate(domain, round_, kind, reply):
        if domain == "beta" and kind == MessageType.TRAIN and key in reply.content["arrays"]:
            arrays = reply.content["arrays"].to_torch_state_dict()
            arrays[key][0] = count
            reply.content["arrays"] = ArrayRecord.from_torch_state_dict(arrays)
        return reply

    extra = {"fedpft": ["method.head_epochs=1"], "fedproto": ["target_domain=none"]}.get(method, [])
    nodes = [*PARTICIPANTS, "target"] if method == "fedproto" else PARTICIPANTS
    s = serve(FakeGrid(inflate, node_order=nodes), flower_cfg(cache_file, tmp_path, f"method={method}", *extra),
              tmp_path)
    assert list(s["dropped_clients"]) == ["beta"], s.get("dropped_clients")
    assert f"{key}" in s["dropped_clients"]["beta"] and "training rows" in s["dropped_clients"]["beta"]


def test_a_method_that_evaluates_the_target_with_the_clients_models_needs_no_target_over_flower(cache_file, tmp_path):
    with pytest.raises(ConfigError, match="method=fedproto evaluates the target domain with each client's own model"):
        serve(FakeGrid(), flower_cfg(cache_file, tmp_path, "method=fedproto"), tmp_path)


class SlowReplies:
    """A Grid whose replies come in one per pull, each to the message of the same position."""

    def __init__(self, stop=None):
        self.pulls, self.stop = 0, stop

    def push_messages(self, messages):
        self.ids = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.ids)

    def pull_messages(self, ids):
        self.pulls += 1
        if self.stop is not None and self.pulls == 2:
            self.stop.set()
        if self.pulls > len(self.ids):
            return []
        reply = type("Reply", (), {})()
        reply.metadata = type("Metadata", (), {"reply_to_message_id": self.ids[self.pulls - 1]})()
        return [reply]


def test_the_server_pulls_replies_every_tenth_of_a_second_and_stops_when_asked():
    """Flower's deployed Grid waits 3 s between pulls; the ServerApp's grid (deployed and simulated) pulls
    every 0.1 s, returns what came within the timeout, and stops its wait once the run is stopped."""
    import threading

    from federate.flower.grid import PullingGrid

    start = time.monotonic()
    replies = PullingGrid(SlowReplies()).send_and_receive([None] * 3, timeout=30)
    assert len(replies) == 3 and time.monotonic() - start < 1.5
    start = time.monotonic()
    grid = SlowReplies()
    grid.pull_messages = lambda ids: []  # nobody answers
    assert PullingGrid(grid).send_and_receive([None], timeout=0.5) == [] and time.monotonic() - start < 1.5
    stop = threading.Event()  # set during the second pull, as Ctrl-C sets it in the simulation
    with pytest.raises(KeyboardInterrupt):
        PullingGrid(SlowReplies(stop), stop).send_and_receive([None] * 3, timeout=30)


def test_a_reply_of_another_dtype_than_the_method_sends_is_rejected():
    reference = {"gmm.means": torch.zeros(2, 1, 3, dtype=torch.float16)}
    assert check_update({"gmm.means": torch.zeros(2, 1, 3)}, reference) == "gmm.means is float32, not float16"
    assert check_update({"gmm.means": torch.zeros(2, 1, 3, dtype=torch.float16)}, reference) is None


def same_splits(flower_dir, local_dir):
    """The Flower server wrote the in-process run's splits.json, and the summaries say so."""
    assert (flower_dir / "splits.json").read_bytes() == (local_dir / "splits.json").read_bytes()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (flower_dir, local_dir))
    assert a["splits_sha256"] == b["splits_sha256"] is not None
    assert (a["cache_identity_sha256"], a["cache_checksums"]) == (b["cache_identity_sha256"], b["cache_checksums"])


def test_a_node_whose_split_sizes_are_not_the_servers_takes_no_part(cache_file, tmp_path, caplog):
    """Its cache is not the server's: the splits.json the server writes would not be what it trains on."""
    from flwr.app import ConfigRecord

    def other_cache(domain, round_, kind, reply):
        if kind == MessageType.QUERY and domain == "gamma":
            sizes = json.loads(str(reply.content["config"]["sizes"]))
            reply.content["config"] = ConfigRecord({**dict(reply.content["config"]),
                                                    "sizes": json.dumps({**sizes, "train": sizes["train"] + 1})})
        return reply

    with caplog.at_level(logging.WARNING):
        s = serve(FakeGrid(other_cache), flower_cfg(cache_file, tmp_path), tmp_path)
    assert "node 103 is not a client of this run: client gamma has split sizes" in caplog.text
    assert list(s["personalization"]) == ["alpha", "beta"]
    assert "gamma" in json.loads((tmp_path / "splits.json").read_text())  # the run's splits, whoever takes part


def test_the_updates_are_aggregated_in_the_clients_order_whatever_the_node_ids(cache_file, tmp_path):
    """Flower draws node ids at random: the order they sort in must not change a bit of the result (a resumed
    run's SuperNodes get other ids than the run they resume)."""
    serve(FakeGrid(), flower_cfg(cache_file, tmp_path / "a"), tmp_path / "a")
    serve(FakeGrid(node_order=PARTICIPANTS[::-1]), flower_cfg(cache_file, tmp_path / "b"), tmp_path / "b")
    same_outputs(outputs(tmp_path / "a"), outputs(tmp_path / "b"))


def test_an_interrupted_flower_run_resumes_without_the_clients_it_had_dropped(cache_file, tmp_path):
    gone = lambda domain, round_, kind, reply: None if domain == "gamma" and round_ >= 2 else reply  # noqa: E731

    def interrupted(domain, round_, kind, reply):
        if round_ == 3:
            raise KeyboardInterrupt
        return gone(domain, round_, kind, reply)

    serve(FakeGrid(gone), flower_cfg(cache_file, tmp_path / "whole"), tmp_path / "whole")
    with pytest.raises(Interrupted, match="interrupted after round 2 of 3"):
        serve(FakeGrid(interrupted), flower_cfg(cache_file, tmp_path / "cut"), tmp_path / "cut")
    resumed = serve(FakeGrid(gone), flower_cfg(cache_file, tmp_path / "cut"), tmp_path / "cut")
    assert list(resumed["dropped_clients"]) == ["gamma"] and "round 2" in resumed["dropped_clients"]["gamma"]
    same_outputs(outputs(tmp_path / "whole"), outputs(tmp_path / "cut"))


def test_bf16_over_flower_equals_bf16_in_process(cache_file, tmp_path):
    flower = serve(FakeGrid(), flower_cfg(cache_file, tmp_path / "f", "precision=bf16"), tmp_path / "f")
    cfg = config("federate", [f"cache_file={cache_file}", "model.name=fedclip/planted", "target_domain=target",
                              "rounds=3", "lr=1e-3", "precision=bf16"])
    same_results(flower, run(cfg, tmp_path / "l"))


@pytest.mark.slow
def test_a_deployed_server_finds_the_default_cache_path_like_the_cli(cache_file, tmp_path):
    import shutil

    default = tmp_path / "cache" / "planted" / "fedclip--planted.h5"  # <cache_dir>/<dataset>/<model>.h5
    default.parent.mkdir(parents=True)
    shutil.copy(cache_file, default)
    cfg = config("federate", [f"cache_dir={tmp_path / 'cache'}", "dataset=folder", "dataset.name=planted",
                              "model.name=fedclip/planted", "target_domain=target", "rounds=2", "lr=1e-3",
                              "flower.startup_timeout=10"])
    assert cfg.cache_file is None
    s = serve(FakeGrid(), cfg, tmp_path / "out")
    assert s["config"]["cache_file"] == str(default) and s["rounds"] == 2


def test_a_supernode_without_a_domain_is_told_how_to_set_one(cache_file, tmp_path):
    from flwr.app import ArrayRecord, ConfigRecord, Message

    state = {"image.0.weight": torch.zeros(64, 64)}
    msg = Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(state),
                              "config": ConfigRecord({"round": 1, "settings": ship(flower_cfg(cache_file, tmp_path)),
                                                      "participants": json.dumps(PARTICIPANTS)})}),
                  dst_node_id=5, message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="partition='<client>'.*alpha, beta, gamma"):
        client_train(msg, ctx)


def test_check_update_rejects_wrong_keys_shapes_and_non_finite_values():
    ref = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    assert check_update({"w": torch.ones(2, 2), "b": torch.ones(2)}, ref) is None
    assert "keys" in check_update({"w": torch.ones(2, 2)}, ref)
    assert "shape (3, 2)" in check_update({"w": torch.ones(3, 2), "b": torch.ones(2)}, ref)
    assert "non-finite" in check_update({"w": torch.tensor([[1.0, float("nan")], [0, 0]]), "b": torch.ones(2)}, ref)


def test_bad_updates_are_logged_and_not_aggregated(cache_file, tmp_path, caplog):
    from flwr.app import ArrayRecord

    def poison(domain, round_, kind, reply):
        if kind == MessageType.TRAIN and domain == "beta":
            arrays = reply.content["arrays"].to_torch_state_dict()
            arrays["image.0.weight"][0, 0] = float("nan") if round_ == 2 else 0.0
            if round_ == 3:
                arrays["image.0.bias"] = torch.zeros(3)
            reply.content["arrays"] = ArrayRecord.from_torch_state_dict(arrays)
        return reply

    with caplog.at_level(logging.WARNING):
        s = serve(FakeGrid(poison), flower_cfg(cache_file, tmp_path, "flower.min_clients=2"), tmp_path)
    assert "round 2: client beta (node 102) sent an update the server rejects: image.0.weight has non-finite " \
        "values; dropping it" in caplog.text  # and it is not asked again
    assert s["rounds"] == 3 and 0 <= s["generalization"] <= 1 and "stopped" not in s
    assert list(s["dropped_clients"]) == ["beta"] and "non-finite" in s["dropped_clients"]["beta"]


def test_a_client_that_stops_answering_is_dropped_and_the_run_goes_on(cache_file, tmp_path, caplog):
    gone = lambda domain, round_, kind, reply: None if domain == "gamma" and round_ >= 2 else reply  # noqa: E731
    with caplog.at_level(logging.WARNING):
        s = serve(FakeGrid(gone), flower_cfg(cache_file, tmp_path), tmp_path)
    assert "did not answer" in caplog.text and "gamma" in caplog.text
    rows = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [sorted(r["val_acc"]) for r in rows] == [PARTICIPANTS, ["alpha", "beta"], ["alpha", "beta"]]
    assert "stopped" not in s and len(rows) == 3


def test_below_min_clients_the_run_stops_keeping_what_it_recorded(cache_file, tmp_path):
    gone = lambda domain, round_, kind, reply: None if domain != "alpha" and round_ >= 3 else reply  # noqa: E731
    s = serve(FakeGrid(gone), flower_cfg(cache_file, tmp_path, "flower.min_clients=2"), tmp_path)
    assert "only 1 client(s) left, fewer than flower.min_clients=2" in s["stopped"]
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 2 and s["best_round"] in (1, 2)
    assert (tmp_path / "adapter.safetensors").exists()
    with pytest.raises(ConfigError, match="only 1 of the run.s 3 clients registered"):  # nothing recorded: a plain error
        serve(FakeGrid(lambda d, r, k, rep: rep if d == "alpha" else None), flower_cfg(cache_file, tmp_path / "x"),
              tmp_path / "x")


SIMULATED = ("partition=iid", "partition.clients_per_domain=2", "clients_per_round=4")  # 6 clients, 4 a round


def simulation_args(cache_file, out) -> list[str]:
    return ["federate", "backend=flower", f"cache_file={cache_file}", "model.name=fedclip/planted",
            "target_domain=target", "rounds=4", "lr=1e-3", *SIMULATED, f"hydra.run.dir={out}"]


@pytest.fixture(scope="module")
def simulated(cache_file, tmp_path_factory):
    """`python -m federate backend=flower`, uninterrupted: its terminal output and its folder."""
    out = tmp_path_factory.mktemp("simulated") / "sim"
    proc = run_cli(*simulation_args(cache_file, out), cwd=out.parent, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout, out


@pytest.mark.slow
def test_a_personal_method_in_flowers_simulation_equals_the_in_process_run(cache_file, tmp_path):
    """FedPer in Flower's simulation engine (Ray actors, each client's head kept in its node's context):
    the in-process numbers; its client_states folder goes once the run is done."""
    out = tmp_path / "sim"
    args = [a for a in simulation_args(cache_file, out) if a != "rounds=4"] + ["rounds=3", "method=fedper"]
    proc = run_cli(*args, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    same_results(summary, in_process(cache_file, tmp_path / "l", 3, *SIMULATED, "method=fedper"))
    assert summary["personal_params"] == 5 * 64 + 5 and not (out / "client_states").exists()


@pytest.mark.slow
def test_backend_flower_runs_in_flowers_simulation_engine(cache_file, simulated, tmp_path):
    """One SuperNode per client: two IID clients per domain, four of the six sampled each round."""
    stdout, out = simulated
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["personalization"]) == 6 and summary["clients_per_round"] == 4
    same_results(summary, in_process(cache_file, tmp_path / "l", 4, *SIMULATED))
    same_splits(out, tmp_path / "l")
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [len(r["sampled"]) for r in rows] == [4, 4, 4, 4]
    # quiet: Flower's debug lines and deprecation notice, alembic's and Ray's warnings go to the log file only
    noise = ("alembic", "DEPRECATED", "[flwr][DEBUG]", "FutureWarning", "Manually terminating")
    assert not [line for line in stdout.splitlines() if any(n in line for n in noise)], stdout[-3000:]
    assert "[flwr][DEBUG]" in (out / "federate.log").read_text()


@pytest.mark.slow
def test_a_simulation_stopped_by_ctrl_c_or_sigterm_resumes_to_the_same_outputs(cache_file, simulated, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) after round 1, then `kill` (SIGTERM to the process) after
    round 2: each stops at once with one line saying how to resume, and leaves no process behind; the same
    command then ends with the uninterrupted run's outputs."""
    out, done = tmp_path / "cut", 0
    history = out / "history.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for stop in (lambda p: os.killpg(p.pid, signal.SIGINT), lambda p: p.send_signal(signal.SIGTERM)):
        proc = subprocess.Popen([sys.executable, "-m", *simulation_args(cache_file, out)], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:  # stopped as soon as it completes a round
            wait_for(lambda p=proc, n=done: p.poll() is not None or history_rows(history) > n, 180,
                     f"round {done + 1}", every=0.01)
            assert proc.poll() is None, "the run ended before it could be stopped"
            stop(proc)
            stdout, _ = proc.communicate(timeout=60)
            wait_for(lambda p=proc: not group_alive(p.pid), 30, "the run's processes (Ray's included) to end")
        except BaseException:
            kill_all([proc])
            raise
        done = history_rows(history)
        assert done < 4, "the run ended before it could be stopped"
        lines = [line for line in stdout.splitlines() if "resume with" in line]
        assert proc.returncode == 130 and len(lines) == 1, stdout[-3000:]
        assert f"interrupted after round {done} of 4; resume with: " in lines[0] and f"hydra.run.dir={out}" in lines[0]
        assert "Traceback" not in stdout and "SIGTERM received" not in stdout, stdout[-3000:]
        assert not (out / "summary.json").exists()
        assert json.loads((out / "checkpoint.json").read_text())["round"] == done
    resumed = run_cli(*simulation_args(cache_file, out), cwd=tmp_path, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"resuming {out} after round {done} of 4" in (out / "federate.log").read_text()
    same_outputs(outputs(simulated[1]), outputs(out))
    assert not list(out.glob("checkpoint*"))


def history_rows(history: Path) -> int:
    return history.read_text().count("\n") if history.exists() else 0


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (a zombie waiting for its reaper does not), from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]  # after "pid (comm)"
        except (OSError, IndexError):  # it ended meanwhile
            continue
        if state != "Z" and int(group) == pgid:
            return True
    return False


# ---------------------------------------------------------------- a real deployment on loopback
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_all(procs) -> None:
    """Stop Flower processes started in their own process groups (with what they started)."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)


def wait_for(predicate, seconds: float, what: str, every: float = 0.5):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


# flower-supernode, except that an idle SuperNode asks the SuperLink for messages every 0.2 s instead of
# every 3 s (fixed in flwr's start_client_internal): a deployed round then takes seconds less, and nothing
# else changes
QUICK_SUPERNODE = """
import sys, time, types
import flwr.supernode.start_client_internal as node
from flwr.supernode.cli import flower_supernode
node.time = types.SimpleNamespace(**{**vars(time), "sleep": lambda s: time.sleep(min(s, 0.2))})
sys.argv[0] = "flower-supernode"
sys.exit(flower_supernode())
"""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, cache_file):
    """flower-superlink and one flower-supernode per participant, insecure, on 127.0.0.1."""
    home = tmp_path_factory.mktemp("flwr_home")
    port = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}  # (a site may lower it too: docs/flower.md)
    procs = {}

    def start(name, *args):
        log = open(home / f"{name}.log", "w")
        procs[name] = subprocess.Popen([*args], cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)

    bindir = Path(sys.executable).parent
    start("superlink", bindir / "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
          "--host", "127.0.0.1", "--port", str(port), "--database", str(home / "state.db"))
    for d in PARTICIPANTS:
        start(d, sys.executable, "-c", QUICK_SUPERNODE, "--insecure", "--superlink", f"127.0.0.1:{port}", "--port",
              str(free_port()), "--node-config", f"partition='{d}' cache-file='{cache_file}'")
    log_of = lambda name: (home / f"{name}.log").read_text(errors="ignore")  # noqa: E731
    try:
        wait_for(lambda: log_of("superlink").count("Activated node_id") >= 3, 90, "3 SuperNodes to register")
        yield {"env": env, "home": home, "procs": procs, "log_of": log_of}
    finally:
        kill_all(procs.values())


def flwr_run(deployment, out: Path, *overrides):
    settings = ["model.name=fedclip/planted", "target_domain=target", "lr=0.001", *overrides]
    run_config = f"output_dir={json.dumps(str(out))} overrides={json.dumps(' '.join(settings))}"
    proc = subprocess.run([Path(sys.executable).parent / "flwr", "run", str(ROOT), "test", "--run-config", run_config],
                          env=deployment["env"], cwd=deployment["home"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Successfully started run" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_deployment_on_loopback_matches_in_process_and_survives_a_killed_client(deployment, cache_file, tmp_path):
    """One deployed run: its first round equals the in-process run's, to 1e-6 (the FakeGrid tests above
    cover the server's rounds after it); then gamma's SuperNode is killed, and the run goes on without it."""
    out = tmp_path / "deployed"
    flwr_run(deployment, out, f"cache_file={cache_file}", "rounds=3", "flower.round_timeout=30",
             "flower.min_clients=2")
    history = out / "history.jsonl"
    wait_for(lambda: history.exists() and history.read_text().count("\n") >= 1, 240, "the first round")
    os.killpg(deployment["procs"]["gamma"].pid, signal.SIGKILL)  # the SuperNode and its ClientApp process
    wait_for(lambda: (out / "summary.json").exists(), 400, "the run to finish without gamma")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in history.read_text().splitlines()]
    assert len(rows) == 3 and "stopped" not in summary
    assert "gamma" in rows[0]["val_acc"] and all("gamma" not in r["val_acc"] for r in rows[2:])
    assert "gamma" in summary["dropped_clients"]

    in_process(cache_file, tmp_path / "local", 1)
    local = json.loads((tmp_path / "local" / "history.jsonl").read_text().splitlines()[0])
    assert rows[0]["sampled"] == local["sampled"]
    for key in ("train_loss", "val_acc", "test_acc"):
        assert rows[0][key] == pytest.approx(local[key], abs=1e-6), key
    assert rows[0]["target_acc"] == pytest.approx(local["target_acc"], abs=1e-6)


def lie(what):
    """A tamper function: client beta breaks one rule in round 2 (`what`: the rule)."""
    from flwr.app import ArrayRecord, MetricRecord

    def tamper(domain, round_, kind, reply):
        if domain != "beta" or round_ != 2:
            return reply
        metrics = dict(reply.content["metrics"])
        if kind == MessageType.EVALUATE and what in ("val_acc=1e9", "val_acc=nan", "no test_acc", "val_acc=0.3333"):
            if what == "no test_acc":
                metrics.pop("test_acc")
            else:
                metrics["val_acc"] = float(what.split("=")[1])
        elif kind == MessageType.TRAIN and what in ("num-examples=10**6", "train_loss=nan", "num-examples=2.5"):
            metrics[what.split("=")[0]] = eval(what.split("=")[1]) if "**" in what else float(what.split("=")[1])
        elif kind == MessageType.TRAIN and what in ("int64 weights", "float64 weights"):
            dtype = torch.int64 if what.startswith("int64") else torch.float64
            arrays = {k: v.to(dtype) for k, v in reply.content["arrays"].to_torch_state_dict().items()}
            reply.content["arrays"] = ArrayRecord.from_torch_state_dict(arrays)
        else:
            return reply
        reply.content["metrics"] = MetricRecord(metrics)
        return reply
    return tamper


@pytest.fixture(scope="module")
def silent_beta(cache_file, tmp_path_factory):
    """Summaries of runs in which beta stops answering in round 2, from its train or evaluate exchange on."""
    runs = {}

    def summary(kind):
        if kind not in runs:
            def silent(d, r, k, rep):
                stop = r > 2 or (r == 2 and (kind == MessageType.TRAIN or k == MessageType.EVALUATE))
                return None if d == "beta" and stop else rep

            out = tmp_path_factory.mktemp("silent")
            runs[kind] = serve(FakeGrid(silent), flower_cfg(cache_file, out), out)
        return runs[kind]
    return summary


@pytest.mark.parametrize("what", ["val_acc=1e9", "val_acc=nan", "val_acc=0.3333", "no test_acc", "num-examples=10**6",
                                  "num-examples=2.5", "train_loss=nan", "int64 weights", "float64 weights"])
def test_a_lying_client_is_dropped_and_cannot_change_the_summary(cache_file, tmp_path, silent_beta, what):
    """The liar's run equals a run in which beta simply stops answering in the same exchange."""
    liar = serve(FakeGrid(lie(what)), flower_cfg(cache_file, tmp_path), tmp_path)
    quiet = silent_beta(MessageType.EVALUATE if "acc" in what else MessageType.TRAIN)
    assert list(liar["dropped_clients"]) == ["beta"] and "round 2" in liar["dropped_clients"]["beta"]
    for key in ("best_round", "generalization", "personalization", "val_mean", "overall", "clients"):
        assert liar[key] == quiet[key], key
    assert all(0 <= a <= 1 for a in liar["personalization"].values())


def test_sampled_rounds_over_flower_equal_sampled_rounds_in_process(cache_file, tmp_path):
    flower = serve(FakeGrid(), flower_cfg(cache_file, tmp_path / "f", "clients_per_round=2"), tmp_path / "f")
    cfg = config("federate", [f"cache_file={cache_file}", "model.name=fedclip/planted", "target_domain=target",
                              "rounds=3", "lr=1e-3", "clients_per_round=2"])
    same_results(flower, run(cfg, tmp_path / "l"))
    rows = [[json.loads(x)["sampled"] for x in (d / "history.jsonl").read_text().splitlines()] for d in
            (tmp_path / "f", tmp_path / "l")]
    assert rows[0] == rows[1] and all(len(r) == 2 for r in rows[0])


def test_a_client_that_lies_about_its_domain_is_dropped(cache_file, tmp_path, caplog):
    """The server knows each client's domain from its own splits: a node claiming another domain (right
    name and sizes) would file its accuracy under that domain; it takes no part, and summary.json says so."""
    from flwr.app import ConfigRecord

    def sketchy(domain, round_, kind, reply):
        if kind == MessageType.QUERY and domain == "gamma":
            reply.content["config"] = ConfigRecord({**dict(reply.content["config"]), "domain": "alpha"})
        return reply

    with caplog.at_level(logging.WARNING):
        s = serve(FakeGrid(sketchy), flower_cfg(cache_file, tmp_path), tmp_path)
    assert "client gamma says its domain is 'alpha', this run's splits put it in 'gamma'" in caplog.text
    assert list(s["personalization_domains"]) == ["alpha", "beta"] and list(s["personalization"]) == ["alpha", "beta"]
    assert "its domain is 'alpha'" in s["dropped_clients"]["gamma"]


def test_a_client_registered_unusably_is_listed_as_dropped(cache_file, tmp_path):
    from flwr.app import ConfigRecord

    def nonsense(domain, round_, kind, reply):
        if kind == MessageType.QUERY and domain == "beta":
            reply.content["config"] = ConfigRecord({**dict(reply.content["config"]), "sizes": json.dumps({"train": 0})})
        return reply

    s = serve(FakeGrid(nonsense), flower_cfg(cache_file, tmp_path), tmp_path)
    assert list(s["dropped_clients"]) == ["beta"] and "at the start" in s["dropped_clients"]["beta"]


@pytest.mark.slow
def test_every_client_of_a_split_file_takes_part_or_is_listed_as_dropped(cache_file, tmp_path):
    """A split file of 15 clients (5 per domain): each is a SuperNode of its own; the clients no node
    registered as are listed in dropped_clients, never silently left out."""
    in_process(cache_file, tmp_path / "iid", 1, "partition=iid", "partition.clients_per_domain=5")
    split_file = tmp_path / "iid" / "splits.json"
    names = list(json.loads(split_file.read_text()))
    assert len(names) == 15
    every = serve(FakeGrid(node_order=names), flower_cfg(cache_file, tmp_path / "all", f"split_file={split_file}"),
                  tmp_path / "all")
    assert sorted(every["personalization"]) == sorted(names) and "dropped_clients" not in every
    three = serve(FakeGrid(node_order=names[:3]), flower_cfg(cache_file, tmp_path / "3", f"split_file={split_file}"),
                  tmp_path / "3")
    assert sorted(three["dropped_clients"]) == sorted(names[3:])
    assert all("no Flower node registered" in why for why in three["dropped_clients"].values())


def test_the_simulation_starts_one_supernode_per_client_of_a_split_file(cache_file, tmp_path):
    from federate.flower.simulation import supernodes

    in_process(cache_file, tmp_path / "iid", 1, "partition=iid", "partition.clients_per_domain=5")
    cfg = flower_cfg(cache_file, tmp_path, f"split_file={tmp_path / 'iid' / 'splits.json'}")
    assert supernodes(cfg) == 15 and supernodes(flower_cfg(cache_file, tmp_path)) == 3


def test_a_client_sending_exploded_weights_is_dropped_not_the_run(cache_file, tmp_path, caplog):
    """Finite weights a million times too large: the run would stop, blaming lr; that client goes instead."""
    from flwr.app import ArrayRecord

    def inflate(domain, round_, kind, reply):
        if kind == MessageType.TRAIN and domain == "beta" and round_ == 2:
            arrays = {k: v * 1e6 for k, v in reply.content["arrays"].to_torch_state_dict().items()}
            reply.content["arrays"] = ArrayRecord.from_torch_state_dict(arrays)
        return reply

    with caplog.at_level(logging.WARNING):
        s = serve(FakeGrid(inflate), flower_cfg(cache_file, tmp_path), tmp_path)
    assert s["rounds"] == 3 and "stopped" not in s and "exploded weights" in s["dropped_clients"]["beta"]
