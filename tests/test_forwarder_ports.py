"""One target's Forwarder on its own: a real nats-server and a real (refusing) target, and only the narrow
StudyRouting port of its router member (no Router, no study KV): it hands jobs on, naks with the one backoff,
and asks for a reassignment on a second failure."""

from __future__ import annotations

import asyncio
import json

from services.router.forwarder import Forwarder
from services.router.spool import Spool, spool_root
from shared.bus.connection import connect, ensure_streams, publish_event
from shared.bus.jetstream import ensure_stream
from shared.config import Config
from shared.contract import subjects
from shared.contract.events import ForwardJob
from shared.storage.objectstore import Backends, content_digest
from tests.helpers import free_port, make_config

STUDY = "1.2.826.0.1.3680043.8.498.77"
DATA = b"not really a data set, the target refuses the connection anyway" * 10


class Routing:
    """The StudyRouting port, in memory: the recorded member of every study, and what the forwarder asked."""

    def __init__(self, config: Config, member: str):
        self.config = config
        self.member = member
        self.reassigned: list[tuple[str, str, str, str]] = []
        self.health: list[tuple[str, bool]] = []

    async def member_of(self, group: str, study_uid: str) -> str | None:
        return self.member

    async def reassign(self, group: str, study_uid: str, down: str, rule: str) -> bool:
        self.reassigned.append((group, study_uid, down, rule))
        return True

    async def set_health(self, target: str, up: bool) -> None:
        self.health.append((target, up))


def _config(tmp_path, nats_url: str) -> Config:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: every send is refused
    return Config.model_validate(make_config(tmp_path, nats_url, router={
        "targets": {"DOWN": {"kind": "dicomweb", "url": dead, "timeout_s": 5},
                    "UP": {"kind": "dicomweb", "url": dead, "timeout_s": 5}},
        "groups": {"g": {"members": {"DOWN": 1, "UP": 1}, "on_member_down": "reassign"}},
        "forward": {"backoff_initial_s": 0.2, "backoff_max_s": 1, "max_attempts": 10}}))


def _job(config: Config, target: str) -> ForwardJob:
    return ForwardJob(target=target, group="g", rule="r", study_uid=STUDY, series_uid=f"{STUDY}.1",
                      sop_uid=f"{STUDY}.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                      transfer_syntax_uid="1.2.840.10008.1.2.1", digest=content_digest(DATA), size=len(DATA),
                      backend=config.storage.staging)


async def _until(predicate, timeout: float, what: str) -> None:
    for _ in range(int(timeout / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _scenario(config: Config, member: str):
    nc = await connect(config, "test-forwarder")
    backends = Backends(config)
    backends.get(config.storage.staging).put(content_digest(DATA), DATA)
    routing = Routing(config, member)
    spool = Spool(spool_root(config.router.forward.spool_dir))
    fwd = Forwarder(nc, routing, backends, "DOWN", spool)
    try:
        await ensure_stream(nc, subjects.out_stream_config(config.stream))
        await ensure_stream(nc, subjects.dlq_stream_config(config.stream))
        js = nc.jetstream()
        await fwd.start()
        await publish_event(js, _job(config, "DOWN"), 2.0)

        async def queues() -> dict[str, int]:
            info = await js.stream_info(subjects.OUT_STREAM, subjects_filter=">")
            return dict(info.state.subjects or {})

        if member == "UP":  # the study lives on UP now: the job is handed on, nothing is sent here
            await _until(lambda: _on(queues, "UP"), 20, "the job on UP's queue")
        else:
            await _until(lambda: _drained(queues), 30, "the job settled by a reassignment")
        dlq = (await js.stream_info(subjects.DLQ_STREAM)).state.messages
        return routing, await queues(), dlq
    finally:
        await fwd.stop()
        await nc.close()
        backends.close()
        spool.close()


async def _on(queues, target: str) -> bool:
    return any(s.startswith(f"{subjects.OUT_PREFIX}.{target}.") for s in await queues())


async def _drained(queues) -> bool:
    return not await queues()


def test_a_job_of_a_study_moved_to_another_member_is_handed_on(tmp_path, nats_server):
    config = _config(tmp_path, nats_server.url)
    routing, queues, dlq = asyncio.run(_scenario(config, "UP"))
    assert all(s.startswith(f"{subjects.OUT_PREFIX}.UP.") for s in queues) and sum(queues.values()) == 1
    assert routing.reassigned == [] and routing.health == [] and dlq == 0


def test_a_refused_job_is_retried_once_then_its_study_reassigned(tmp_path, nats_server):
    config = _config(tmp_path, nats_server.url)
    routing, queues, dlq = asyncio.run(_scenario(config, "DOWN"))
    assert routing.reassigned == [("g", STUDY, "DOWN", "r")]  # on the second failure, not the first
    assert routing.health == [("DOWN", False), ("DOWN", False)]  # refused twice: one nak, one redelivery
    assert queues == {} and dlq == 0


def _instance(n: int, side: int = 8) -> tuple[ForwardJob, bytes]:
    from dicomflow.synthetic import ct_instance
    from tests.helpers import encode

    ds = ct_instance(STUDY, f"{STUDY}.2", n, rows=side, cols=side)
    data = encode(ds)
    return ForwardJob(target="W", rule="r", study_uid=STUDY, series_uid=ds.SeriesInstanceUID,
                      sop_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                      transfer_syntax_uid="1.2.840.10008.1.2.1", digest=content_digest(data), size=len(data),
                      backend="stage"), data


def _corrupt(store, digest: str) -> None:
    """Flip one byte of the stored object, as a failing disk would (its size unchanged)."""
    with open(store.path(digest), "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 0xFF]))


async def _one_batch(config: Config, jobs: list[ForwardJob]):
    nc = await connect(config, "test-forwarder")
    backends = Backends(config)
    spool = Spool(spool_root(config.router.forward.spool_dir))
    routing = Routing(config, "W")
    fwd = Forwarder(nc, routing, backends, "W", spool)
    try:
        await ensure_streams(nc, config)  # the events stream, for dicom.forward.failed
        await ensure_stream(nc, subjects.out_stream_config(config.stream))
        await ensure_stream(nc, subjects.dlq_stream_config(config.stream))
        js = nc.jetstream()
        for job in jobs:  # queued before the forwarder starts: one batch
            await publish_event(js, job, 2.0)
        await fwd.start()

        async def settled() -> bool:
            return (await js.stream_info(subjects.OUT_STREAM)).state.messages == 0

        await _until(settled, 30, "every job settled")
        dlq = await js.stream_info(subjects.DLQ_STREAM)
        letters = [json.loads((await js.get_msg(subjects.DLQ_STREAM, seq)).data)
                   for seq in range(dlq.state.first_seq, dlq.state.last_seq + 1)] if dlq.state.messages else []
        return routing, letters, list(spool.path.rglob("*"))
    finally:
        await fwd.stop()
        await nc.close()
        backends.close()
        spool.close()


def test_a_corrupt_copy_is_never_sent(tmp_path, nats_server, caplog):
    """One batch of three instances to a real STOW-RS endpoint: A's staged copy is corrupt and its placement good (sent
    from the placement), B is corrupt in both (dead-lettered at once, on its first delivery, never sent; the target is
    not marked down for it), C is as stored (sent)."""
    from tests.router_harness import StowReceiver

    receiver = StowReceiver()
    try:
        config = Config.model_validate(make_config(tmp_path, nats_server.url, storage={
            "staging": "stage", "backends": {"stage": {"kind": "fs", "path": "stage"},
                                             "archive": {"kind": "fs", "path": "archive"}},
            "policies": {"default": {"placements": ["archive"]}}}, router={
            "targets": {"W": {"kind": "dicomweb", "url": receiver.url, "timeout_s": 10}},
            "forward": {"backoff_initial_s": 0.2, "backoff_max_s": 1, "max_attempts": 10,
                        "spool_dir": str(tmp_path / "spool")}}))
        (a, data_a), (b, data_b), (c, data_c) = (_instance(n) for n in (1, 2, 3))
        backends = Backends(config)
        stage, archive = backends.get("stage"), backends.get("archive")
        for job, data in ((a, data_a), (b, data_b), (c, data_c)):
            stage.put(job.digest, data)
            archive.put(job.digest, data)
        _corrupt(stage, a.digest)
        _corrupt(stage, b.digest)
        _corrupt(archive, b.digest)
        backends.close()

        routing, letters, spooled = asyncio.run(_one_batch(config, [a, b, c]))
        assert receiver.received == {a.sop_uid: data_a, c.sop_uid: data_c}  # byte for byte; B never
        assert receiver.requests == 1  # A and C in one request: B did not hold them back
        assert [(d["job"]["sop_uid"], d["attempts"]) for d in letters] == [(b.sop_uid, 1)]
        assert "instance bytes corrupt" in letters[0]["reason"] and "archive: corrupt" in letters[0]["reason"]
        assert routing.health == [("W", True)] and routing.reassigned == []
        assert spooled == []  # the send's files removed, the unsent copy's too
        assert f"instance {a.sop_uid} read from placement 'archive': stage corrupt" in caplog.text
    finally:
        receiver.close()


def test_a_batch_over_its_byte_limit_goes_as_several_sends_in_order(tmp_path, nats_server):
    """Three 512 KiB instances fetched as one batch, with forward.batch_bytes 1 MiB: three STOW-RS requests, one
    instance each, in the batch's order (the spool holds one at a time), every one byte for byte."""
    from tests.router_harness import StowReceiver

    receiver = StowReceiver()
    order: list[str] = []
    original = receiver.server.RequestHandlerClass.do_POST

    def recording(handler):
        original(handler)
        order.extend(sop for sop in receiver.received if sop not in order)

    receiver.server.RequestHandlerClass.do_POST = recording
    try:
        config = Config.model_validate(make_config(tmp_path, nats_server.url, storage={
            "staging": "stage", "backends": {"stage": {"kind": "fs", "path": "stage"}},
            "policies": {"default": {"placements": ["stage"]}}}, router={
            "targets": {"W": {"kind": "dicomweb", "url": receiver.url, "timeout_s": 10}},
            "forward": {"batch_bytes": 1024 * 1024, "spool_dir": str(tmp_path / "spool")}}))
        instances = [_instance(n, side=512) for n in (1, 2, 3)]
        backends = Backends(config)
        for job, data in instances:
            backends.get("stage").put(job.digest, data)
        backends.close()
        routing, letters, spooled = asyncio.run(_one_batch(config, [job for job, _ in instances]))
        assert receiver.requests == 3 and order == [job.sop_uid for job, _ in instances]
        assert receiver.received == {job.sop_uid: data for job, data in instances}
        assert letters == [] and spooled == [] and routing.health == [("W", True)] * 3
    finally:
        receiver.close()


def test_an_unreadable_copy_is_retried_until_it_reads(tmp_path, nats_server, caplog):
    """The staged object cannot be read (a directory where its file should be: EISDIR, a real I/O error): the job is
    retried with the backoff, never dead-lettered, the target never marked down; once the object reads, it is sent."""
    from tests.router_harness import StowReceiver

    receiver = StowReceiver()
    try:
        config = Config.model_validate(make_config(tmp_path, nats_server.url, storage={
            "staging": "stage", "backends": {"stage": {"kind": "fs", "path": "stage"}},
            "policies": {"default": {"placements": ["stage"]}}}, router={
            "targets": {"W": {"kind": "dicomweb", "url": receiver.url, "timeout_s": 10}},
            "forward": {"backoff_initial_s": 0.2, "backoff_max_s": 0.4, "max_attempts": 100,
                        "spool_dir": str(tmp_path / "spool")}}))
        job, data = _instance(1)
        backends = Backends(config)
        stage = backends.get("stage")
        stage.path(job.digest).mkdir(parents=True)

        async def scenario():
            nc = await connect(config, "test-forwarder")
            spool = Spool(spool_root(config.router.forward.spool_dir))
            routing = Routing(config, "W")
            fwd = Forwarder(nc, routing, backends, "W", spool)
            try:
                await ensure_streams(nc, config)
                await ensure_stream(nc, subjects.out_stream_config(config.stream))
                await ensure_stream(nc, subjects.dlq_stream_config(config.stream))
                js = nc.jetstream()
                await publish_event(js, job, 2.0)
                await fwd.start()

                async def retried_twice() -> bool:
                    return caplog.text.count(f"instance {job.sop_uid} not read, retried") >= 2

                await _until(retried_twice, 30, "two retries of the unreadable job")
                stage.path(job.digest).rmdir()
                stage.put(job.digest, data)

                async def settled() -> bool:
                    return (await js.stream_info(subjects.OUT_STREAM)).state.messages == 0

                await _until(settled, 30, "the job sent once readable")
                return routing, (await js.stream_info(subjects.DLQ_STREAM)).state.messages
            finally:
                await fwd.stop()
                await nc.close()
                spool.close()

        routing, dlq = asyncio.run(scenario())
        backends.close()
        assert receiver.received == {job.sop_uid: data} and dlq == 0
        assert routing.health == [("W", True)]  # the unreadable copy never counted against the target
        assert "Is a directory" in caplog.text
    finally:
        receiver.close()
