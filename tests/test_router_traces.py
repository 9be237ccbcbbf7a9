"""One trace from the modality to the gateway: ingest.c_store -> router.instance -> router.forward_job ->
router.forward, across three processes and two streams; a poison forward job is parked once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.router_harness import Cluster, Gateway, make_studies
from tests.test_router_e2e import STREAM_RULES


def spans(path: Path) -> list[dict]:
    """The spans a console exporter wrote into a log that also holds log lines."""
    text, dec, out, i = path.read_text(errors="replace"), json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) >= 0:
        try:
            obj, end = dec.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        if isinstance(obj, dict) and "context" in obj and "name" in obj:
            out.append(obj)
        i = end
    return out


@pytest.fixture
def cluster(tmp_path, nats_server):
    gw = Gateway(tmp_path, "GW1").start()
    c = Cluster(tmp_path, nats_server.url, {"targets": {"GW1": gw.target()},
                                            "groups": {"gateways": {"members": {"GW1": 1}}}}, STREAM_RULES)
    c.tree["telemetry"] = {"metrics_port": 0, "traces": "console"}
    c.write()
    yield c, gw
    c.stop()
    gw.kill()


def test_ingest_router_and_forward_are_one_trace(tmp_path, cluster):
    c, gw = cluster
    c.start_ingest()
    c.start_router()
    studies = make_studies(tmp_path / "studies", 1, 1)
    (_, files), = studies.items()
    c.send([files[0].parent])
    wait_for(lambda: len(gw.received()) == 1, 60, what="the instance at the gateway")

    def collected() -> dict[str, list[dict]] | None:
        found: dict[str, list[dict]] = {}
        for log in (tmp_path / "ingest.log", tmp_path / "router-0.log"):
            for s in spans(log):
                found.setdefault(s["name"], []).append(s)
        wanted = {"ingest.c_store", "router.instance", "router.forward_job", "router.forward"}
        return found if wanted <= set(found) else None
    found = wait_for(collected, 30, what="the spans of all three steps")
    [ingest] = found["ingest.c_store"]
    [routed] = found["router.instance"]  # exactly one per message: no sibling span of the consumer's
    [job] = found["router.forward_job"]
    [forward] = found["router.forward"]
    trace_id = ingest["context"]["trace_id"]
    assert {s["context"]["trace_id"] for s in (routed, job, forward)} == {trace_id}
    assert routed["parent_id"] == ingest["context"]["span_id"]
    assert job["parent_id"] == routed["context"]["span_id"]
    assert forward["parent_id"] == job["context"]["span_id"]


def test_a_poison_forward_job_is_terminated_once_and_the_next_one_sent(tmp_path, cluster, nats_server):
    import asyncio
    import time

    import nats

    from shared.contract import subjects

    c, gw = cluster
    c.tree["router"]["forward"]["backoff_initial_s"] = 0.2
    c.write()
    c.start_ingest()
    c.start_router()
    studies = make_studies(tmp_path / "studies", 1, 1)
    (uid, files), = studies.items()
    c.send([files[0].parent])  # the forwarder is up and has sent once
    wait_for(lambda: len(gw.received()) == 1, 60, what="the first instance at the gateway")

    async def publish_garbage() -> None:
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().publish(subjects.forward_job("GW1", "1.2.3", "1.2.3.4"), b"not a job")
        await nc.close()
    asyncio.run(publish_garbage())
    log = tmp_path / "router-0.log"
    wait_for(lambda: "poison message on router.out.GW1" in log.read_text(errors="replace"), 30,
             what="the poison job parked")
    time.sleep(3)  # several backoffs and fetches later: never redelivered, so parked exactly once
    assert log.read_text(errors="replace").count("poison message on router.out.GW1") == 1
