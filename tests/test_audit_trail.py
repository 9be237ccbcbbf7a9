"""The audit trail of a process against real servers: records reach the DICOM_AUDIT stream of a real nats-server
and a real syslog audit repository (rsyslogd over TLS with client certificates); emitting never waits, even
with NATS away, and what the bounded queue cannot hold is dropped and counted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from xml.etree import ElementTree as ET

from prometheus_client import REGISTRY

from dicomflow.natsserver import free_port
from shared.audit import records
from shared.audit.syslog import BOM
from shared.audit.trail import AuditTrail
from shared.config import load_config
from tests.helpers import REPO, make_config, wait_for, write_config
from tests.syslog_harness import Rsyslog, make_certs

CT = "1.2.840.10008.5.1.4.1.1.2"


def _count(result: str) -> float:
    return REGISTRY.get_sample_value("dicomflow_audit_records_total", {"result": result}) or 0.0


def _syslog(tmp_path, certs, port, **over) -> dict:
    return {"host": "127.0.0.1", "port": port, "ca": str(certs.ca), "server_name": "localhost",
            "cert": str(certs.client_cert), "key": str(certs.client_key), **over}


def _association(study: str):
    tally = records.AssociationTally("MODALITY", "DICOMFLOW", "127.0.0.1")
    tally.add(0, study, CT)
    tally.add(0, study, CT)
    return tally.record()


def test_records_reach_the_stream_and_a_tls_syslog_repository(tmp_path, nats_server):
    certs = make_certs(tmp_path / "tls")
    repo = Rsyslog(tmp_path / "rsyslog", certs).start()
    try:
        tree = make_config(tmp_path, nats_server.url, audit={"site_id": "HOSPITAL",
                                                             "syslog": _syslog(tmp_path, certs, repo.port)})
        config = load_config(overrides=tree, environ={})
        trail = AuditTrail(config, "test")
        sent = [_association(f"1.2.3.{i}") for i in range(5)]
        for record in sent:
            trail.emit(record)
        assert trail.close(30), "not every record was published"
        wait_for(lambda: len(repo.lines()) >= 5, 20, what="five messages at the syslog repository")
        got = {}
        for line in repo.lines():
            version, facility, severity, app, procid, msgid, raw = line.split("|", 6)
            # rsyslog parsed each as RFC 5424 (octet-counted frames over TLS): version 1, authpriv, notice
            assert (version, facility, severity, app, msgid) == ("1", "10", "5", "dicomflow", "IHE+RFC-3881")
            xml = raw.encode().split(BOM, 1)[1]
            root = ET.fromstring(xml)
            assert root.find("EventIdentification/EventID").get("csd-code") == "110104"
            assert root.find("AuditSourceIdentification").get("AuditEnterpriseSiteID") == "HOSPITAL"
            study = root.find("ParticipantObjectIdentification")
            got[study.get("ParticipantObjectID")] = study.find("SOPClass").get("NumberOfInstances")
        assert got == {f"1.2.3.{i}": "2" for i in range(5)}
        # ... and the same records in the stream, listed by the CLI
        path = write_config(tmp_path, tree)
        out = subprocess.run([sys.executable, "-m", "dicomflow", "--config", str(path), "audit", "--json"], cwd=REPO,
                             capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        listed = json.loads(out.stdout)
        assert [r["audit_id"] for r in listed] == [r.audit_id for r in sent]
    finally:
        repo.stop()


def test_a_repository_that_does_not_trust_us_gets_nothing_and_the_stream_still_gets_everything(tmp_path, nats_server):
    certs = make_certs(tmp_path / "tls")
    repo = Rsyslog(tmp_path / "rsyslog", certs).start()
    try:
        before = REGISTRY.get_sample_value("dicomflow_audit_syslog_total", {"result": "failed"}) or 0.0
        # we verify the server against a CA that did not sign it: no TLS session, nothing sent
        tree = make_config(tmp_path, nats_server.url,
                           audit={"syslog": _syslog(tmp_path, certs, repo.port, ca=str(certs.other_ca))})
        trail = AuditTrail(load_config(overrides=tree, environ={}), "test")
        trail.emit(_association("1.2.3.9"))
        assert trail.close(30)
        after = REGISTRY.get_sample_value("dicomflow_audit_syslog_total", {"result": "failed"})
        assert after == before + 1
        # without our client certificate the repository refuses us (x509/certvalid)
        tree = make_config(tmp_path, nats_server.url,
                           audit={"syslog": _syslog(tmp_path, certs, repo.port, cert="", key="")})
        trail = AuditTrail(load_config(overrides=tree, environ={}), "test")
        trail.emit(_association("1.2.3.10"))
        assert trail.close(30)
        time.sleep(1)
        assert repo.lines() == []
        path = write_config(tmp_path, tree)
        out = subprocess.run([sys.executable, "-m", "dicomflow", "--config", str(path), "audit", "--json",
                              "--study", "1.2.3.10"], cwd=REPO, capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin"})
        assert [r["studies"][0]["study_uid"] for r in json.loads(out.stdout)] == ["1.2.3.10"]
    finally:
        repo.stop()


def test_emitting_never_waits_for_an_absent_nats_and_a_full_queue_drops_and_counts(tmp_path):
    tree = make_config(tmp_path, f"nats://127.0.0.1:{free_port()}", audit={"queue": 3})
    trail = AuditTrail(load_config(overrides=tree, environ={}), "test")
    dropped = _count("dropped")
    t0 = time.perf_counter()
    for i in range(50):
        trail.emit(_association(f"1.2.3.{i}"))
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"50 emits took {elapsed:.3f} s with NATS away"
    wait_for(lambda: _count("dropped") >= dropped + 47, 5, what="47 records dropped past the queue of 3")
    t0 = time.perf_counter()
    assert trail.close(1) is False  # the three queued ones could not be kept
    assert time.perf_counter() - t0 < 8
    assert _count("dropped") == dropped + 50


def test_the_stream_keeps_records_for_the_configured_years(tmp_path, nats_server):
    tree = make_config(tmp_path, nats_server.url, audit={"max_age_days": 3650})
    trail = AuditTrail(load_config(overrides=tree, environ={}), "test")
    trail.emit(_association("1.2.3.4"))
    assert trail.close(30)
    from shared.bus.jetstream import api
    from tests.helpers import run_async

    async def info():
        import nats

        nc = await nats.connect(nats_server.url)
        try:
            return await api(nc, "STREAM.INFO.DICOM_AUDIT")
        finally:
            await nc.close()

    cfg = run_async(info())["config"]
    assert cfg["subjects"] == ["dicom.audit.>"] and cfg["storage"] == "file"
    assert cfg["max_age"] == 3650 * 86400 * 10**9


def test_a_repository_that_hangs_costs_one_timeout_not_one_per_record(tmp_path, nats_server):
    import socket

    certs = make_certs(tmp_path / "tls")
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # accepts TCP in the backlog, never answers the TLS handshake
    try:
        failed = REGISTRY.get_sample_value("dicomflow_audit_syslog_total", {"result": "failed"}) or 0.0
        tree = make_config(tmp_path, nats_server.url,
                           audit={"syslog": _syslog(tmp_path, certs, hole.getsockname()[1], timeout_s=1.0)})
        trail = AuditTrail(load_config(overrides=tree, environ={}), "test")
        t0 = time.monotonic()
        for i in range(20):
            trail.emit(_association(f"1.2.4.{i}"))
        assert trail.close(30)
        elapsed = time.monotonic() - t0
        # the first record waits out the handshake timeout (twice: one reconnect), the rest are not held up
        assert elapsed < 6, f"20 records took {elapsed:.1f} s behind a hanging repository"
        assert REGISTRY.get_sample_value("dicomflow_audit_syslog_total", {"result": "failed"}) == failed + 20
        path = write_config(tmp_path, tree)
        out = subprocess.run([sys.executable, "-m", "dicomflow", "--config", str(path), "audit", "--json",
                              "--limit", "100"], cwd=REPO, capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin"})
        assert len(json.loads(out.stdout)) == 20
    finally:
        hole.close()
