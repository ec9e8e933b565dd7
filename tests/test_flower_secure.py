"""Flower's secure deployment as docs/flower.md describes it, on 127.0.0.1: TLS with a CA made by
openssl, and SuperNode authentication (--enable-supernode-auth): a SuperNode whose public key was
registered with `flwr supernode register` connects, one that was not is refused."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="needs Flower: pip install -e '.[flower]'")
pytestmark = pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                                reason="needs openssl (TLS certificates) and ssh-keygen (SuperNode keys)")

from test_flower import free_port, kill_all, wait_for  # noqa: E402

BIN = Path(sys.executable).parent


def make_credentials(folder: Path) -> None:
    """A CA, the SuperLink's certificate for 127.0.0.1 signed by it, and two SuperNode key pairs (ECDSA
    P-384 in OpenSSH format, as Flower requires): the commands of docs/flower.md."""
    def run(*args):
        subprocess.run(args, cwd=folder, check=True, capture_output=True, timeout=60)

    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=fedclip test CA",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
        "-out", "server.csr")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "1", "-extfile", "san.ext", "-out", "server.pem")
    for name in ("registered", "stranger"):
        run("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", name, "-f", name)


@pytest.fixture
def secure_superlink(tmp_path):
    """A SuperLink with TLS and SuperNode authentication on 127.0.0.1, and the flwr CLI's connection to it
    (verified with the CA's certificate)."""
    make_credentials(tmp_path)
    port = free_port()
    (tmp_path / "config.toml").write_text(
        f'[superlink]\ndefault = "secure"\n\n[superlink.secure]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{tmp_path / "ca.crt"}"\n')
    env = {**os.environ, "FLWR_HOME": str(tmp_path), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    procs = {}

    def start(name, *args):
        log = open(tmp_path / f"{name}.log", "w")
        procs[name] = subprocess.Popen([*args], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        return procs[name]

    def log_of(name):
        return (tmp_path / f"{name}.log").read_text(errors="ignore")

    start("superlink", BIN / "flower-superlink", "--ssl-ca-certfile", "ca.crt", "--ssl-certfile", "server.pem",
          "--ssl-keyfile", "server.key", "--enable-supernode-auth", "--disable-runtime-dependency-installation",
          "--host", "127.0.0.1", "--port", str(port), "--database", str(tmp_path / "state.db"))
    try:
        wait_for(lambda: "Uvicorn running on https://127.0.0.1" in log_of("superlink"), 30, "the SuperLink")
        yield {"env": env, "port": port, "folder": tmp_path, "start": start, "log_of": log_of}
    finally:
        kill_all(procs.values())


def flwr_json(link, *args) -> dict:
    """The answer of a flwr CLI command run with --format json."""
    proc = subprocess.run([BIN / "flwr", *args, "--format", "json"], cwd=link["folder"], env=link["env"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def supernode(link, name, key, *extra):
    return link["start"](name, BIN / "flower-supernode", "--root-certificates", "ca.crt", "--superlink",
                         f"127.0.0.1:{link['port']}", "--auth-supernode-private-key", key, "--port",
                         str(free_port()), "--node-config", f"partition='{name}'", *extra)


@pytest.mark.slow
def test_only_a_registered_supernode_connects_over_tls(secure_superlink):
    link = secure_superlink
    node_id = flwr_json(link, "supernode", "register", "registered.pub", "secure")["node-id"]

    supernode(link, "registered", "registered")
    stranger = supernode(link, "stranger", "stranger", "--max-retries", "1")
    wait_for(lambda: f"Activated node_id={node_id}" in link["log_of"]("superlink"), 45, "the registered SuperNode")
    assert stranger.wait(timeout=45) != 0  # refused: its key was never registered
    assert "Failed to activate SuperNode" in link["log_of"]("stranger")
    nodes = flwr_json(link, "supernode", "list", "secure")["nodes"]
    assert [(str(n["node-id"]), n["status"]) for n in nodes] == [(str(node_id), "online")]
