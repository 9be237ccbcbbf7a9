"""Traces linked across the bus; the store's pure policy choice, its catalogue entries and group commit."""

from __future__ import annotations

import asyncio
import threading

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dicomflow.natsserver import free_port
from dicomflow.synthetic import write_study
from services.ingest.loopthread import LoopThread
from services.store.index import GroupCommit
from services.store.placement import choose_policy, tenant_of_event
from shared.catalogue.sqlite import open_sqlite
from shared.config import Config, load_config
from shared.contract.events import InstanceReceived, InstanceTags, utcnow
from shared.telemetry import setup_tracing
from tests.helpers import scu_send, wait_for


def test_ingest_span_and_store_span_are_one_trace(tmp_path, nats_server):
    from pydicom import dcmread

    from services.ingest.service import serve as serve_ingest
    from services.store.service import serve as serve_store

    config = load_config(overrides={"data_dir": str(tmp_path / "data"), "nats": {"url": nats_server.url},
                                    "stream": {"partitions": 4}, "ingest": {"port": free_port(), "workers": 1},
                                    "telemetry": {"metrics_port": 0}}, environ={})
    exporter = InMemorySpanExporter()
    provider = setup_tracing("test", config.telemetry, exporter=exporter)
    stop_ingest = threading.Event()
    ingest = threading.Thread(target=serve_ingest, args=(config,), kwargs={"stop": stop_ingest}, daemon=True)
    ingest.start()
    loop = LoopThread("store")
    stop_store = asyncio.Event()
    store_done = asyncio.run_coroutine_threadsafe(serve_store(config, stop=stop_store), loop.loop)
    try:
        from dicomflow.natsserver import wait_port

        wait_port("127.0.0.1", config.ingest.port, 20)
        _, files = write_study(tmp_path / "s", 1)
        assert scu_send(config.ingest.port, [dcmread(files[0])]) == [0]

        def spans():
            provider.force_flush()
            found = {s.name: s for s in exporter.get_finished_spans()}
            return found if {"ingest.c_store", "store.instance"} <= set(found) else None

        found = wait_for(spans, 30, what="both spans")
        ingest_span, store_span = found["ingest.c_store"], found["store.instance"]
        assert store_span.context.trace_id == ingest_span.context.trace_id
        assert store_span.parent is not None and store_span.parent.span_id == ingest_span.context.span_id
        assert ingest_span.attributes["dicom.status"] == "0x0000"
        assert store_span.attributes["dicom.sop_uid"] == ingest_span.attributes["dicom.sop_uid"]
    finally:
        stop_ingest.set()
        loop.loop.call_soon_threadsafe(stop_store.set)
        store_done.result(30)
        ingest.join(30)
        loop.stop()


def test_policy_by_tenant_then_calling_ae_then_institution_then_default():
    config = Config.model_validate({"storage": {
        "backends": {"local": {"kind": "fs"}, "regional": {"kind": "fs", "path": "regional"}},
        "policies": {"default": {"placements": ["local"]}, "regional": {"placements": ["regional"]},
                     "both": {"placements": ["local", "regional"]}},
        "institutions": {"CT_NORTH": "regional", "South Clinic": "both"}},
        "access": {"tenants": {"north": {"aes": ["CT_N2"], "policy": "both"}, "plain": {"aes": ["CT_P"]}}}})
    assert choose_policy(config, "north", "CT_NORTH", "") == "both"  # the tenant's own policy first
    assert choose_policy(config, "plain", "CT_NORTH", "South Clinic") == "regional"  # no policy of its own
    assert choose_policy(config, "default", "OTHER", "South Clinic") == "both"
    assert choose_policy(config, "default", "OTHER", "") == "default"
    strict = config.model_copy(update={"storage": config.storage.model_copy(update={"default_policy": None})})
    assert choose_policy(strict, "default", "OTHER", "Unknown") is None


def test_tenant_of_an_event_from_before_tenants_is_derived_from_its_calling_ae():
    config = Config.model_validate({"access": {"tenants": {"north": {"aes": ["CT_N"]}}, "default_tenant": None}})
    assert tenant_of_event(config.access, _event("1.2.3.1.1", "a" * 64).model_copy(update={"calling_ae": "CT_N"})) \
        == "north"
    assert tenant_of_event(config.access, _event("1.2.3.1.1", "a" * 64)) == ""  # nobody's: administrators only
    assert tenant_of_event(config.access, _event("1.2.3.1.1", "a" * 64).model_copy(update={"tenant": "x"})) == "x"


def _event(sop: str, digest: str) -> InstanceReceived:
    tags = InstanceTags(study_uid="1.2.3", series_uid="1.2.3.1", sop_uid=sop, modality="CT")
    return InstanceReceived(tags=tags, transfer_syntax_uid="1.2.840.10008.1.2.1", digest=digest, size=10,
                            backend="local", calling_ae="CT1", called_ae="DICOMFLOW", received_at=utcnow())


def test_group_commit_batches_concurrent_records_and_keeps_outcomes(tmp_path):
    from tests.test_catalogue import entry, study

    catalogue = open_sqlite(tmp_path / "c.sqlite")
    commits = GroupCommit(catalogue)
    calls = []
    original = catalogue.record_batch

    def counting(entries):
        calls.append(len(entries))
        return original(entries)

    catalogue.record_batch = counting
    instances = study(50, series=5)

    async def go():
        first = await asyncio.gather(*(commits.record_many([entry(ds)]) for ds in instances))
        again = await asyncio.gather(*(commits.record_many([entry(ds)]) for ds in instances))
        return first, again

    first, again = asyncio.run(go())
    first, again = [r for rs in first for r in rs], [r for rs in again for r in rs]
    assert [r.outcome for r in first] == ["new"] * 50
    assert [r.outcome for r in again] == ["same"] * 50
    assert catalogue.count() == 50
    assert sum(calls) == 100 and len(calls) < 100  # rows shared transactions
    catalogue.close()


def test_place_many_reads_each_claim_check_once_for_every_placement(tmp_path):
    """Two placements besides staging: each gets every instance's bytes, read (and verified) from staging once."""
    from services.store.storing import Storer
    from shared.config import Config
    from shared.storage.objectstore import Backends, content_digest

    config = Config.model_validate({
        "data_dir": str(tmp_path),
        "storage": {"staging": "stage",
                    "backends": {"stage": {"kind": "fs", "path": "stage"}, "copy1": {"kind": "fs", "path": "c1"},
                                 "copy2": {"kind": "fs", "path": "c2"}},
                    "policies": {"default": {"placements": ["copy1", "copy2"]}}, "default_policy": "default"}})
    backends = Backends(config)
    stage = backends.get("stage")
    bodies = [f"instance {i} ".encode() * 500 for i in range(12)]
    events = []
    for i, body in enumerate(bodies):
        digest = content_digest(body)
        stage.put(digest, body)
        tags = InstanceTags(study_uid="1.2.3", series_uid="1.2.3.1", sop_uid=f"1.2.3.1.{i}", modality="CT")
        events.append(InstanceReceived(tags=tags, transfer_syntax_uid="1.2.840.10008.1.2.1", digest=digest,
                                       size=len(body), backend="stage", calling_ae="CT1", called_ae="DICOMFLOW",
                                       received_at=utcnow()))
    missing = events[0].model_copy(update={"digest": content_digest(b"never staged")})
    reads = []
    original_get = stage.get
    stage.get = lambda digest: reads.append(digest) or original_get(digest)
    storer = Storer(config, None, backends, open_sqlite(tmp_path / "c.sqlite"))
    try:
        errors = storer.place_many([(e, ["copy1", "copy2"]) for e in [*events, missing]])
        assert errors[:-1] == [None] * len(events)
        assert errors[-1] is not None  # its claim-check is gone: retried, never acknowledged
        assert sorted(reads[:-1]) == sorted(e.digest for e in events) and len(reads) == len(events) + 1
        for name in ("copy1", "copy2"):
            assert all(backends.get(name).get(e.digest) == body for e, body in zip(events, bodies, strict=True))
    finally:
        backends.close()
