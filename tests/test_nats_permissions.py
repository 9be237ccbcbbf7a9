"""Least privilege on the bus, against a real nats-server configured with `dicomflow nats-permissions`: the
services started one by one (as compose and Kubernetes run them: ingest, store, router, web, autoscaler, releaser), each
with its own user, store and route a
study with no permission violation; the ingest may publish only dicom.in.>, a store credential cannot
inject an instance, the integration user reads events (and the change feed) and nothing else. compose/ and k8s/ ship that block."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import nats
import pytest
import yaml

from dicomflow.natsserver import NatsServer, free_port, wait_port
from dicomflow.synthetic import write_study
from shared.bus.permissions import ROLES, authorization_block, password_variable
from shared.bus.publish_blocking import SocketPublisher
from shared.config import load_config
from tests.helpers import REPO, make_config, run_async, wait_for, write_config
from tests.router_harness import Gateway

PASSWORDS = {role: f"pw-{role}-{i}" for i, role in enumerate(ROLES)}


@pytest.fixture
def secured_nats(tmp_path, monkeypatch):
    for role, password in PASSWORDS.items():
        monkeypatch.setenv(password_variable(role), password)
    config = load_config(overrides=make_config(tmp_path), environ={})
    server = NatsServer(tmp_path / "nats", free_port(), 0, log_file=tmp_path / "nats.log",
                        extra_config=authorization_block(config)).start()
    yield server
    server.kill()


def _violations(tmp_path: Path) -> list[str]:
    return [ln for ln in (tmp_path / "nats.log").read_text().splitlines() if "Violation" in ln]


def _service(tmp_path: Path, config_path: Path, role: str, command: str, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
    env.update(DICOMFLOW__NATS__USER=role, DICOMFLOW__NATS__PASSWORD=PASSWORDS[role])
    return subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(config_path), command, *args], cwd=REPO,
                            env=env, stdout=open(tmp_path / f"{command}.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _refused(server: NatsServer, role: str, subject: str) -> str:
    """Publish ``subject`` as ``role`` over the blocking publisher; the server's refusal text."""
    cfg = load_config(overrides={"nats": {"user": role, "password": PASSWORDS[role]}}, environ={})
    publisher = SocketPublisher([server.url], f"probe-{role}", 2, 3, cfg.nats)
    try:
        with pytest.raises((ConnectionError, TimeoutError)) as refused:
            publisher.send(subject, b"{}", {"Nats-Msg-Id": f"probe-{role}-{subject}"}, 3)
        return str(refused.value)
    finally:
        publisher.close()


def test_each_service_works_with_only_its_own_subjects_and_nothing_else(tmp_path, secured_nats):
    server = secured_nats
    gateway = Gateway(tmp_path, "ARCHIVE").start()
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: all, action: forward, to: ARCHIVE, when: complete}\n")
    tree = make_config(tmp_path, server.url, router={"rules_file": str(rules), "completion": {"quiet_s": 1},
                                                    "targets": {"ARCHIVE": gateway.target()}},
                       web={"port": free_port()})
    config_path = write_config(tmp_path, tree)
    events: list[str] = []

    async def on_event(msg):
        events.append(msg.subject)

    async def integration_subscribes():
        nc = await nats.connect(server.url, user="integration", password=PASSWORDS["integration"])
        await nc.subscribe("dicom.stored.>", cb=on_event)
        await nc.subscribe("dicom.study.>", cb=on_event)
        await nc.subscribe("dicom.deleted.>", cb=on_event)
        return nc

    procs = [_service(tmp_path, config_path, role, role) for role in ("ingest", "store", "router", "web")]
    try:
        wait_port("127.0.0.1", tree["ingest"]["port"], 60)
        wait_port("127.0.0.1", tree["web"]["port"], 60)
        assert run_async(_send_and_watch(integration_subscribes, events, tmp_path, tree))
        # the router forwarded the completed study through its queue (ROUTER_OUT) to the gateway
        wait_for(lambda: len(gateway.received()) == 3, 60, what="the study forwarded to the gateway")
        # the autoscaler reads the lag and the membership as its own user
        asc = _service(tmp_path, config_path, "autoscaler", "autoscaler", "--once")
        assert asc.wait(120) == 0, (tmp_path / "autoscaler.log").read_text()[-2000:]
        # the staging releaser reads the ack floors and the three streams as its own user (a configuration where
        # staging is not the placement, or it would have nothing to read)
        split = {**tree, "storage": {"staging": "local", "backends": {"local": {"path": "objects"},
                                                                      "archive": {"path": "archive"}},
                                     "policies": {"default": {"placements": ["archive"]}}}}
        (tmp_path / "releaser").mkdir()
        rel = _service(tmp_path, write_config(tmp_path / "releaser", split), "releaser", "releaser", "--once", "--json")
        assert rel.wait(120) == 0, (tmp_path / "releaser.log").read_text()[-2000:]
        assert '"blocked": ""' in (tmp_path / "releaser.log").read_text()
        # an operator's command as the admin user
        status = _service(tmp_path, config_path, "admin", "status")
        assert status.wait(60) == 0, (tmp_path / "status.log").read_text()[-2000:]
    finally:
        gateway.kill()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    assert _violations(tmp_path) == [], "\n".join(_violations(tmp_path))
    for name in ("ingest", "store", "router", "web", "autoscaler", "releaser"):
        assert "Violation" not in (tmp_path / f"{name}.log").read_text()

    # what each credential may not do, answered by the server itself
    assert "Permissions Violation" in _refused(server, "store", "dicom.in.1_2_3.1_2_3_4")
    assert "Permissions Violation" in _refused(server, "router", "dicom.in.1_2_3.1_2_3_4")
    assert "Permissions Violation" in _refused(server, "ingest", "dicom.stored.1_2_3.1_2_3_4")
    assert "Permissions Violation" in _refused(server, "ingest", "$JS.API.STREAM.DELETE.DICOM")
    assert "Permissions Violation" in _refused(server, "integration", "dicom.stored.1_2_3.1_2_3_4")
    assert "Permissions Violation" in _refused(server, "integration", "$JS.API.STREAM.PURGE.DICOM_EVENTS")

    async def integration_cannot_read_instances():
        errors: list[str] = []

        async def on_error(exc):
            errors.append(str(exc))

        nc = await nats.connect(server.url, user="integration", password=PASSWORDS["integration"], error_cb=on_error)
        await nc.subscribe("dicom.in.>")
        await nc.flush()
        await _until(lambda: errors, 5)
        await nc.close()
        return errors

    errors = run_async(integration_cannot_read_instances())
    assert any("permissions violation for subscription" in e.lower() for e in errors), errors


async def _until(predicate, timeout: float) -> None:
    import asyncio

    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)


async def _send_and_watch(subscribe, events: list[str], tmp_path: Path, tree: dict) -> bool:
    import asyncio

    nc = await subscribe()
    try:
        study = tmp_path / "study"
        write_study(study, 3)
        res = await asyncio.to_thread(
            subprocess.run, ["storescu", "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1",
                             str(tree["ingest"]["port"]), "+sd", str(study)], capture_output=True, text=True,
            timeout=120)
        assert res.returncode == 0 and "E:" not in res.stderr, res.stderr
        await _until(lambda: sum(s.startswith("dicom.stored.") for s in events) >= 3
                     and any(s.startswith("dicom.study.complete.") for s in events), 60)
        assert sum(s.startswith("dicom.stored.") for s in events) == 3, events
        assert any(s.startswith("dicom.study.complete.") for s in events), events
        # STOW-RS through the DICOMweb service, which publishes as the web user
        other = tmp_path / "other"
        other_uid, paths = write_study(other, 1)
        assert await asyncio.to_thread(_stow, paths[0], f"http://127.0.0.1:{tree['web']['port']}/dicom-web") == 200
        await _until(lambda: sum(s.startswith("dicom.stored.") for s in events) >= 4, 30)
        assert sum(s.startswith("dicom.stored.") for s in events) == 4, events
        # the change feed: over HTTP, read by the DICOMweb service as the web user; over NATS as the integration user
        base = f"http://127.0.0.1:{tree['web']['port']}/dicom-web"
        for _ in range(100):  # the server copies the events into the feed a moment after they are stored
            feed = await asyncio.to_thread(_changefeed, base)
            if len(feed) >= 5:
                break
            await asyncio.sleep(0.1)
        assert [e["Kind"] for e in feed][:4] == ["instance-stored"] * 3 + ["study-complete"], feed
        assert feed[4]["Kind"] == "instance-stored" and feed[4]["State"] == "current", feed
        from shared.changefeed import reading
        from shared.config import AccessConfig
        page = await reading.read(nc, AccessConfig(), None, 10)
        assert [c.sequence for c in page.changes] == [e["Sequence"] for e in feed]
        # DICOMweb DELETE of that study: the web user publishes its dicom.deleted event
        assert await asyncio.to_thread(_delete, f"http://127.0.0.1:{tree['web']['port']}/dicom-web/studies/"
                                                f"{other_uid}") == 204
        await _until(lambda: any(s.startswith("dicom.deleted.") for s in events), 30)
        assert sum(s.startswith("dicom.deleted.") for s in events) == 1, events
    finally:
        await nc.close()
    return True


def _changefeed(base_url: str) -> list[dict]:
    """GET /changefeed (as the anonymous default tenant)."""
    with urllib.request.urlopen(f"{base_url}/changefeed?includeMetadata=false", timeout=30) as resp:
        return json.loads(resp.read())
def _delete(url: str) -> int:
    """DELETE a DICOMweb resource; the HTTP status."""
    with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=30) as resp:
        return resp.status


def _stow(path: Path, base_url: str) -> int:
    """POST one Part-10 file to STOW-RS; the HTTP status."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode())
    req = urllib.request.Request(f"{base_url}/studies", data=body, method="POST", headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status


def test_compose_and_k8s_ship_the_generated_authorization():
    """The block in compose/ and in the k8s ConfigMap is exactly what `dicomflow nats-permissions` prints for the
    configuration they run with, and every service's user and password variable is wired."""
    expected = authorization_block(load_config(REPO / "compose" / "dicomflow.yaml", environ={}))
    assert (REPO / "compose" / "nats" / "authorization.conf").read_text() == expected
    out = subprocess.run([sys.executable, "-m", "dicomflow", "nats-permissions"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                     if not k.startswith("DICOMFLOW")})
    assert out.returncode == 0 and out.stdout == authorization_block(load_config(environ={}))
    nats_cm = next(d for d in yaml.safe_load_all((REPO / "k8s" / "base" / "nats.yaml").read_text())
                   if d["kind"] == "ConfigMap")
    k8s_config = load_config(REPO / "k8s" / "base" / "dicomflow.yaml", environ={})
    assert authorization_block(k8s_config) in nats_cm["data"]["nats.conf"]
    compose = (REPO / "compose" / "docker-compose.yml").read_text()
    for role in ROLES:
        assert password_variable(role) in compose
    for manifest, role in (("ingest", "ingest"), ("store", "store"), ("router", "router"), ("web", "web"),
                           ("autoscaler", "autoscaler")):
        text = (REPO / "k8s" / "base" / f"{manifest}.yaml").read_text()
        assert re.search(rf"DICOMFLOW__NATS__USER, value: {role}\b", text), manifest
        assert re.search(rf"secretKeyRef: {{name: dicomflow-nats, key: {role}}}", text), manifest
