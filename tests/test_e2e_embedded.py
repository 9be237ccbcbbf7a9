"""End to end on the embedded default: dcmtk storescu -> dicomflow run -> stored, byte-identical."""

from __future__ import annotations

import asyncio
import json
import threading

import blake3
import nats
import pytest

from dicomflow.synthetic import write_study
from shared.bus.jetstream import api
from shared.dicom.part10 import part10
from tests.helpers import dataset_bytes, scu_send, start_nats, wait_for


def _stream_messages(url: str, stream: str, subject: str | None = None) -> int:
    async def go():
        nc = await nats.connect(url)
        try:
            info = await api(nc, f"STREAM.INFO.{stream}", {"subjects_filter": subject} if subject else None)
            return info["state"]["messages"] if subject is None else sum((info["state"].get("subjects") or {}).values())
        finally:
            await nc.close()
    return asyncio.run(go())


def _consumers_drained(url: str, stream: str) -> bool:
    """Whether every consumer of ``stream`` has handled everything (nothing pending or unacknowledged)."""
    async def go():
        nc = await nats.connect(url)
        try:
            listing = await api(nc, f"CONSUMER.LIST.{stream}", {})
            return bool(listing["consumers"]) and all(
                c["num_pending"] == 0 and c["num_ack_pending"] == 0 for c in listing["consumers"])
        finally:
            await nc.close()
    return asyncio.run(go())


@pytest.mark.parametrize("engine", ["lean", "pynetdicom"])
def test_study_round_trip_resend_and_export(tmp_path, nats_server, stack_factory, engine):
    stack = stack_factory(nats_server.url, ingest={"engine": engine})
    study_uid, files = write_study(tmp_path / "study", 50, rows=128, cols=128)
    res = stack.storescu(tmp_path / "study")
    assert res.returncode == 0, res.stderr
    wait_for(lambda: stack.instances_of(study_uid) == 50, 60, what="50 stored instances")

    studies = stack.studies()
    entry = next(s for s in studies if s["study_uid"] == study_uid)
    assert entry["instances"] == 50 and entry["series"] == 1
    # One event per instance on the partitioned stream, one stored event per instance.
    assert _stream_messages(nats_server.url, "DICOM") == 50
    wait_for(lambda: _stream_messages(nats_server.url, "DICOM_EVENTS", "dicom.stored.>") == 50, 20,
             what="50 stored events")

    # Every object is byte-identical to what was sent (blake3 of the data set bytes).
    objects = stack.data_dir / "objects"
    sent = {blake3.blake3(dataset_bytes(p)).hexdigest() for p in files}
    for digest in sent:
        stored = objects / digest[:2] / digest
        assert stored.exists(), digest
        assert blake3.blake3(stored.read_bytes()).hexdigest() == digest

    out = tmp_path / "export"
    stack.cli("export", "--study", study_uid, "--out", str(out))
    exported = sorted(out.glob("*.dcm"))
    assert len(exported) == 50
    assert {blake3.blake3(dataset_bytes(p)).hexdigest() for p in exported} == sent

    # Resending the same study: every receipt is an event of its own (so A, B, A keeps A), and the store
    # tells the resend from a new version by the catalogue: nothing new is stored, no stored event is published.
    res = stack.storescu(tmp_path / "study")
    assert res.returncode == 0
    wait_for(lambda: _stream_messages(nats_server.url, "DICOM") == 100, 20, what="the resend's 50 receipts")
    wait_for(lambda: _consumers_drained(nats_server.url, "DICOM"), 30, what="the store to handle the resend")
    assert stack.instances_of(study_uid) == 50
    assert _stream_messages(nats_server.url, "DICOM_EVENTS", "dicom.stored.>") == 50
    assert len(list(objects.glob("??/*"))) == 50


def test_two_associations_at_once(tmp_path, nats_server, stack_factory):
    stack = stack_factory(nats_server.url, ingest={"workers": 2})
    a, _ = write_study(tmp_path / "a", 30)
    b, _ = write_study(tmp_path / "b", 30)
    results = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, stack.storescu(tmp_path / n)))
               for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results.values())
    wait_for(lambda: stack.instances_of(a) == 30 and stack.instances_of(b) == 30, 60, what="both studies stored")


def test_nats_down_mid_study_answers_a700_and_loses_nothing(tmp_path, stack_factory):
    server = start_nats(tmp_path, "flaky")
    try:
        stack = stack_factory(server.url)
        study_uid, files = write_study(tmp_path / "s", 30)
        from pydicom import dcmread
        datasets = [dcmread(p) for p in files]
        first = scu_send(stack.port, datasets[:15])
        assert first == [0] * 15
        server.kill()
        comments: list[str] = []
        second = scu_send(stack.port, datasets[15:18], comments=comments)
        assert second == [0xA700] * 3, [hex(s) for s in second]
        # The Error Comment (an LO of 64 characters) says what failed in whole words.
        for comment in comments:
            assert comment.startswith("event not acknowledged by NATS: "), comment
            assert comment.split(": ", 1)[1] in ("timed out", "server unreachable", "no stream serves the subject")
        server.start()  # same store dir and port: JetStream recovers its data
        # The modality retries everything it was not told succeeded; a full resend is also fine.
        wait_for(lambda: scu_send(stack.port, datasets[:1]) == [0], 30, interval=1, what="ingest reconnected")
        assert scu_send(stack.port, datasets) == [0] * 30
        wait_for(lambda: stack.instances_of(study_uid) == 30, 60, what="all 30 stored after recovery")
        # Each receipt is an event (15 + the probe(s) + 30), each instance is stored once.
        status = json.loads(stack.cli("status", "--json").stdout)
        assert status["stream"]["messages"] >= 46
        wait_for(lambda: _consumers_drained(server.url, "DICOM"), 30, what="the store to handle the resend")
        assert _stream_messages(server.url, "DICOM_EVENTS", "dicom.stored.>") == 30
        assert stack.instances_of(study_uid) == 30
    finally:
        server.kill()


def _raw_file(path, body: bytes, sop_uid: str, ts: str = "1.2.840.10008.1.2.1"):
    """A Part-10 file whose data set bytes are exactly ``body`` (sent as-is with chunked send)."""
    from pynetdicom.sop_class import CTImageStorage

    path.write_bytes(part10(body, CTImageStorage, sop_uid, ts))
    return path


@pytest.mark.parametrize("engine", ["lean", "pynetdicom"])
@pytest.mark.parametrize("case", ["garbage", "truncated", "no_study_uid", "dotdot_uid", "star_uid", "sop_mismatch"])
def test_bad_input_is_refused_and_nothing_stored(tmp_path, nats_server, stack_factory, case, engine):
    from pydicom import dcmread
    from pynetdicom import _config

    stack = stack_factory(nats_server.url, ingest={"engine": engine})
    _, files = write_study(tmp_path / "s", 1)
    ds = dcmread(files[0])
    expected = {"garbage": 0xC000, "truncated": 0xC000, "no_study_uid": 0xC001, "dotdot_uid": 0xC001,
                "star_uid": 0xC001, "sop_mismatch": 0xC002}[case]
    announced = ds.SOPInstanceUID
    if case == "no_study_uid":
        del ds.StudyInstanceUID
    elif case == "dotdot_uid":
        ds.StudyInstanceUID = "1.2.3/../../etc"
    elif case == "star_uid":
        ds.SeriesInstanceUID = "1.2.*"
    elif case == "sop_mismatch":
        announced = "1.2.3.998"
    ds.save_as(tmp_path / "as-sent.dcm", enforce_file_format=True)
    body = dataset_bytes(tmp_path / "as-sent.dcm")
    if case == "garbage":
        body = b"\x08\x00\x18\x00\xff\xff\xff\x7fgarbage-not-dicom" * 10
    elif case == "truncated":
        body = body[: len(body) // 2]
    path = _raw_file(tmp_path / "bad.dcm", body, announced)
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        statuses = scu_send(stack.port, [path])
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert statuses == [expected], [hex(s) for s in statuses]
    assert stack.studies() == []
    assert _stream_messages(stack.tree["nats"]["url"], "DICOM") == 0
    assert not list((stack.data_dir / "objects").glob("??/*"))
    # The ingest is still serving.
    assert scu_send(stack.port, [dcmread(files[0])]) == [0]


def test_restart_keeps_data_and_metrics_are_served(tmp_path, nats_server, stack_factory):
    import urllib.request

    from dicomflow.natsserver import free_port

    base = free_port()
    # The embedded NATS too (no nats.url): a restart must find its JetStream data again.
    stack = stack_factory("", telemetry={"metrics_port": base})
    study_uid, _ = write_study(tmp_path / "s", 12)
    assert stack.storescu(tmp_path / "s").returncode == 0
    wait_for(lambda: stack.instances_of(study_uid) == 12, 60, what="12 stored")

    targets = json.loads((stack.data_dir / "run" / "prometheus-targets.json").read_text())
    by_service = {t["labels"]["service"]: t["targets"] for t in targets}
    ingest_metrics = "".join(urllib.request.urlopen(f"http://{t}/metrics", timeout=5).read().decode()
                             for t in by_service["ingest"])
    assert 'dicomflow_ingest_instances_total{status="0x0000"} 12.0' in ingest_metrics
    assert "dicomflow_ingest_publish_seconds_bucket" in ingest_metrics
    store_metrics = urllib.request.urlopen(f"http://{by_service['store'][0]}/metrics", timeout=5).read().decode()
    assert 'dicomflow_store_instances_total{outcome="new"} 12.0' in store_metrics

    stack.stop()
    stack.start()
    assert stack.instances_of(study_uid) == 12
    status = json.loads(stack.cli("status", "--json").stdout)
    assert status["stream"]["messages"] == 12
    second, _ = write_study(tmp_path / "t", 5)
    assert stack.storescu(tmp_path / "t").returncode == 0
    wait_for(lambda: stack.instances_of(second) == 5, 60, what="5 more stored after restart")
