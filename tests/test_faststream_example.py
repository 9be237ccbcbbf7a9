"""The README's integration example (examples/faststream_integration.py, the same file) against a real
nats-server: FastStream subscribers with the contract's typed models get every dicom.stored and
dicom.study.complete event, and after a kill -9 and a restart exactly the ones they missed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import nats

from shared.bus.connection import ensure_streams, publish_event
from shared.bus.jetstream import consumer_info
from shared.config import load_config
from shared.contract import events
from tests.helpers import REPO, make_config, run_async, wait_for

EXAMPLE = REPO / "examples" / "faststream_integration.py"
NOW = datetime.now(UTC)


def stored(study: str, sop: str) -> events.InstanceStored:
    tags = events.InstanceTags(study_uid=study, series_uid=f"{study}.1", sop_uid=sop)
    return events.InstanceStored(tags=tags, transfer_syntax_uid="1.2.840.10008.1.2.1", digest=sop.replace(".", "") *
                                 4, size=100, policy="default", placements=["fs"], calling_ae="CT", stored_at=NOW,
                                 tenant="default")


def complete(study: str, generation: int = 1) -> events.StudyComplete:
    return events.StudyComplete(study_uid=study, generation=generation, reason="quiet", instances=2, series=[],
                                first_arrival=NOW, last_arrival=NOW, completed_at=NOW)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_the_faststream_example_resumes_from_its_durable_consumers(nats_server, tmp_path):
    config = load_config(overrides=make_config(tmp_path, nats_server.url), environ={})

    async def publish(batch: list[events.Event]) -> None:
        nc = await nats.connect(nats_server.url)
        try:
            await ensure_streams(nc, config)
            for event in batch:
                await publish_event(nc.jetstream(), event, 5)
        finally:
            await nc.close()

    async def settled() -> bool:
        nc = await nats.connect(nats_server.url)
        try:
            infos = [await consumer_info(nc, config.stream.events_name, d) for d in ("example-stored",
                                                                                     "example-complete")]
        finally:
            await nc.close()
        return all(i["num_pending"] == 0 and i["num_ack_pending"] == 0 for i in infos)

    def start(out: Path) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DICOMFLOW", "NATS_"))}
        env["NATS_URL"] = nats_server.url
        return subprocess.Popen([sys.executable, str(EXAMPLE)], cwd=tmp_path, env=env, stdout=open(out, "w"),
                                stderr=open(tmp_path / "example.err", "a"))

    run_async(publish([stored("1.1", "1.1.1"), stored("1.1", "1.1.2"), complete("1.1")]))
    first = tmp_path / "first.jsonl"
    app = start(first)
    try:
        wait_for(lambda: len(lines(first)) == 3, 60, what="the first three events")
        wait_for(lambda: run_async(settled()), 30, what="every delivered event acknowledged")
    finally:
        app.send_signal(signal.SIGKILL)
        app.wait(10)
    assert sorted((e["event"], e.get("sop") or e.get("study")) for e in lines(first)) == \
        [("complete", "1.1"), ("stored", "1.1.1"), ("stored", "1.1.2")]
    assert next(e for e in lines(first) if e["event"] == "complete")["instances"] == 2  # a typed body's field

    # while it is down: two more instances, a study complete, and events it does not subscribe to
    missed = [stored("2.2", "2.2.1"), stored("2.2", "2.2.2"), complete("2.2"), complete("1.1", generation=2)]
    run_async(publish(missed + [events.InstanceRejected(tags=events.InstanceTags(
        study_uid="3.3", series_uid="3.3.1", sop_uid="3.3.1.1"), digest="ee" * 32, reason="no policy",
        rejected_at=NOW)]))
    second = tmp_path / "second.jsonl"
    app = start(second)
    try:
        wait_for(lambda: len(lines(second)) == 3, 60, what="the three missed events")
        wait_for(lambda: run_async(settled()), 30, what="every delivered event acknowledged")
        time.sleep(1.5)  # nothing more comes: no event of the first run again, no study.updated, no rejection
        got = sorted((e["event"], e.get("sop") or e.get("study")) for e in lines(second))
    finally:
        app.send_signal(signal.SIGTERM)
        app.wait(15)
    assert got == [("complete", "2.2"), ("stored", "2.2.1"), ("stored", "2.2.2")]


def test_the_readme_shows_the_example_that_runs():
    code = EXAMPLE.read_text()
    shown = code[code.index("broker = NatsBroker("):]
    assert shown in (REPO / "README.md").read_text()
