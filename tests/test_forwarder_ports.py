"""One target's Forwarder on its own: a real nats-server and a real (refusing) target, and only the narrow
StudyRouting port of its router member (no Router, no study KV): it hands jobs on, naks with the one backoff,
and asks for a reassignment on a second failure."""

from __future__ import annotations

import asyncio

from services.router.forwarder import Forwarder
from services.router.spool import Spool, spool_root
from shared.bus.connection import connect, publish_event
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
