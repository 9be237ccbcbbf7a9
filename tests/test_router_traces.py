"""One trace from the modality to the gateway: ingest.c_store -> router.instance -> router.forward_job ->
router.forward, across three processes and two streams; a poison forward job is parked once, counted, and
the queue goes on."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import nats
import pytest

from dicomflow.natsserver import free_port, wait_port
from shared.contract import subjects
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


def poison_count(port: int, group: str) -> float:
    """``dicomflow_bus_poison_messages_total{group}`` as the router's /metrics shows it (0 before the first)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(f'dicomflow_bus_poison_messages_total{{group="{group}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_poison_forward_job_is_terminated_once_and_counted_and_the_next_one_sent(tmp_path, cluster, nats_server):
    c, gw = cluster
    c.tree["router"]["forward"]["backoff_initial_s"] = 0.2
    metrics_port = free_port()
    c.tree["telemetry"]["metrics_port"] = metrics_port  # the router's /metrics only: the ingest starts without one
    c.write()
    c.start_router()
    wait_port("127.0.0.1", metrics_port, 60)  # it has read the configuration before the ingest's is written
    c.tree["telemetry"]["metrics_port"] = 0
    c.write()
    c.start_ingest()
    studies = make_studies(tmp_path / "studies", 2, 1)
    (_, first), (_, second) = studies.items()
    c.send([first[0].parent])  # the forwarder is up and has sent once
    wait_for(lambda: len(gw.received()) == 1, 60, what="the first instance at the gateway")

    async def publish_garbage() -> None:
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().publish(subjects.forward_job("GW1", "1.2.3", "1.2.3.4"), b"not a job")
        await nc.close()
    asyncio.run(publish_garbage())
    log = tmp_path / "router-0.log"
    wait_for(lambda: "poison message on router.out.GW1" in log.read_text(errors="replace"), 30,
             what="the poison job parked")
    c.send([second[0].parent])  # the queue is not stuck behind it
    wait_for(lambda: len(gw.received()) == 2, 60, what="the next instance at the gateway")
    time.sleep(3)  # several backoffs and fetches later: never redelivered, so parked exactly once
    assert log.read_text(errors="replace").count("poison message on router.out.GW1") == 1
    assert poison_count(metrics_port, "forward-GW1") == 1
