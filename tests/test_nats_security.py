"""NATS over TLS with per-service credentials, against a real nats-server: nats-py's connection and the
ingest's blocking socket publisher both verify the server and authenticate; a refusal is a clear start-up
error naming the setting (never a retry loop, never a 0xA700 per instance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import nkeys
import pytest

from dicomflow.natsserver import NatsServer, free_port
from services.ingest.loopthread import LoopThread
from shared.bus.connection import connect, ensure_streams
from shared.bus.nats_auth import Refused
from shared.bus.publish_blocking import SocketPublisher, blocking_publisher
from shared.config import load_config
from tests.helpers import REPO, make_config, write_config
from tests.tls_certs import CA


def _server(tmp_path, ca: CA, verify_clients: bool = False) -> tuple[NatsServer, str]:
    """A nats-server that requires TLS (and, with ``verify_clients``, a client certificate) and credentials:
    user ``ingest`` with a password, and an nkey user."""
    server_pair = ca.server("nats")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    (tmp_path / "user.nk").write_bytes(seed + b"\n")
    extra = f"""
tls {{
  cert_file: "{server_pair.cert}"
  key_file: "{server_pair.key}"
  ca_file: "{ca.path}"
  verify: {str(verify_clients).lower()}
  timeout: 2
}}
authorization {{
  users = [
    {{user: ingest, password: "s3cret"}}
    {{nkey: {public}}}
  ]
}}
"""
    server = NatsServer(tmp_path / "nats", free_port(), free_port(), log_file=tmp_path / "nats.log",
                        extra_config=extra).start()
    return server, str(tmp_path / "user.nk")


def _config(tmp_path, server: NatsServer, **nats):
    tree = make_config(tmp_path, f"nats://localhost:{server.port}")
    tree["nats"].update(nats)
    return load_config(overrides=tree, environ={})


def _connz(server: NatsServer) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/connz?auth=1", timeout=5) as r:
        return json.load(r)["connections"]


@pytest.fixture
def tls_nats(tmp_path):
    ca = CA(tmp_path / "pki")
    server, seed_file = _server(tmp_path, ca)
    yield server, ca, seed_file
    server.kill()


def test_the_socket_publisher_speaks_tls_and_a_password_and_is_the_one_chosen(tmp_path, tls_nats):
    server, ca, _ = tls_nats
    config = _config(tmp_path, server, tls_ca=str(ca.path), user="ingest", password="s3cret")
    loop = LoopThread("test-nats")
    try:
        nc = loop.call(connect(config, "test-loop"), timeout=15)
        loop.call(ensure_streams(nc, config), timeout=15)
        publisher = blocking_publisher(config, "test-sockets", nc, loop.loop)
        assert isinstance(publisher, SocketPublisher)  # the fast path, not the loop fallback
        ack = publisher.send("dicom.in.1_2.1_2_3", b"{}", {"Nats-Msg-Id": "tls-1"}, 5)
        assert ack.stream == "DICOM" and ack.seq == 1
        conns = {c["name"]: c for c in _connz(server)}
        # both clients are on TLS 1.2+ (as the server saw them) and authenticated as the configured user
        for name in ("test-loop", "test-sockets"):
            assert conns[name]["tls_version"] in ("1.2", "1.3"), conns[name]
            assert conns[name]["authorized_user"] == "ingest"
        publisher.close()
        loop.call(nc.close(), timeout=10)
    finally:
        loop.stop()


def test_an_nkey_signs_the_nonce_on_both_clients(tmp_path, tls_nats):
    server, ca, seed_file = tls_nats
    config = _config(tmp_path, server, tls_ca=str(ca.path), nkey_seed_file=seed_file)
    loop = LoopThread("test-nats")
    try:
        nc = loop.call(connect(config, "test-loop"), timeout=15)
        loop.call(ensure_streams(nc, config), timeout=15)
        publisher = SocketPublisher(config.nats_servers(), "test-sockets", 2, 5, config.nats)
        assert publisher.send("dicom.in.1_2.1_2_4", b"{}", {"Nats-Msg-Id": "nk-1"}, 5).seq == 1
        publisher.close()
        loop.call(nc.close(), timeout=10)
    finally:
        loop.stop()


@pytest.mark.parametrize("setting,nats,expected", [
    ("password", {"user": "ingest", "password": "wrong"}, "nats.user ('ingest') / nats.password"),
    ("no credentials", {}, "none is set"),
    ("untrusted CA", {"user": "ingest", "password": "s3cret", "tls_ca": "OTHER"}, "nats.tls_ca"),
    ("system CAs", {"user": "ingest", "password": "s3cret", "url": "tls://localhost:{port}"}, "nats.tls_ca"),
])
def test_a_refusal_is_raised_at_once_by_both_clients_naming_the_setting(tmp_path, tls_nats, setting, nats, expected):
    server, ca, _ = tls_nats
    nats = dict(nats)
    if nats.get("tls_ca") == "OTHER":
        nats["tls_ca"] = str(CA(tmp_path / "other", "someone else").path)
    elif "url" not in nats:
        nats["tls_ca"] = str(ca.path)
    if "url" in nats:
        nats["url"] = nats["url"].format(port=server.port)
    config = _config(tmp_path, server, **nats)
    loop = LoopThread("test-nats")
    try:
        started = time.monotonic()
        with pytest.raises(Refused) as refused:
            loop.call(connect(config, "test-refused"), timeout=30)
        assert time.monotonic() - started < 10, "a refusal must not be retried"
        assert expected in str(refused.value)
        with pytest.raises(Refused) as refused:
            SocketPublisher(config.nats_servers(), "test-refused", 2, 5, config.nats).check()
        assert expected in str(refused.value)
    finally:
        loop.stop()


def test_a_client_certificate_is_required_when_the_server_verifies_clients(tmp_path):
    ca = CA(tmp_path / "pki")
    server, _ = _server(tmp_path, ca, verify_clients=True)
    try:
        without = _config(tmp_path, server, tls_ca=str(ca.path), user="ingest", password="s3cret")
        with pytest.raises(Refused, match="client certificate"):
            SocketPublisher(without.nats_servers(), "test", 2, 5, without.nats).check()
        client = ca.client("ingest")
        with_cert = _config(tmp_path, server, tls_ca=str(ca.path), tls_cert=str(client.cert),
                            tls_key=str(client.key), user="ingest", password="s3cret")
        publisher = SocketPublisher(with_cert.nats_servers(), "test", 2, 5, with_cert.nats)
        publisher.check()
        publisher.close()
    finally:
        server.kill()


@pytest.mark.parametrize("command,workers", [("ingest", 1), ("ingest", 2), ("store", 1), ("router", 1), ("run", 1)])
def test_a_service_refused_by_nats_exits_at_start_up_naming_the_setting(tmp_path, tls_nats, command, workers):
    """`dicomflow ingest` (one receiver, or a supervisor of two), `store`, `router` and `run` against an external NATS,
    with a wrong password: exit 78 within seconds and a message that names nats.user, not processes restarted
    forever or associations answered 0xA700."""
    server, ca, _ = tls_nats
    tree = make_config(tmp_path, f"nats://localhost:{server.port}", ingest={"workers": workers})
    tree["nats"].update(tls_ca=str(ca.path), user="ingest", password="wrong")
    path = write_config(tmp_path, tree)
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "dicomflow", "--config", str(path), command], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 78, res.stderr[-2000:]
    assert time.monotonic() - started < 30
    assert "refused this process's credentials" in res.stderr and "nats.user ('ingest')" in res.stderr


def test_configuration_checks_the_credentials_are_consistent(tmp_path):
    from shared.config import ConfigError

    with pytest.raises(ConfigError, match="give one NATS credential"):
        load_config(overrides={"nats": {"user": "a", "token": "t"}}, environ={})
    with pytest.raises(ConfigError, match="tls_cert and nats.tls_key go together"):
        load_config(overrides={"nats": {"tls_cert": "/c.pem"}}, environ={})
