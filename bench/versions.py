"""Versions benchmark: what the router pays to tell a resend from a new instance where its study memory cannot
(a study bigger than router.recent_instances, a completed one, a state gone): one lookup of the instance's
earlier events in the instance stream (services/router/history.py ``earlier_digests``), for a new instance (no
earlier event: what every instance of a big study costs) and for a resend (one earlier event).

A nats-server is started here; the stream is declared as the services declare it and filled with ``--studies``
studies of ``--instances`` events each, then every instance of one study is looked up. Last line: one JSON object.

    .venv/bin/python bench/versions.py [--studies 20] [--instances 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicomflow.natsserver import NatsServer, free_port  # noqa: E402
from services.router.history import earlier_digests  # noqa: E402
from shared.bus.connection import ensure_streams  # noqa: E402
from shared.config import Config  # noqa: E402
from shared.contract.events import InstanceReceived, InstanceTags, utcnow  # noqa: E402


def _event(study: int, k: int, receipt: str) -> InstanceReceived:
    tags = InstanceTags(study_uid=f"1.2.826.0.1.{study}", series_uid=f"1.2.826.0.1.{study}.1",
                        sop_uid=f"1.2.826.0.1.{study}.1.{k}")
    return InstanceReceived(tags=tags, transfer_syntax_uid="1.2.840.10008.1.2.1", digest=f"{k:064x}", size=1,
                            backend="local", calling_ae="BENCH", called_ae="DICOMFLOW", received_at=utcnow(),
                            receipt=receipt)


def _ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000, 3)


async def run(url: str, studies: int, instances: int) -> dict:
    config = Config.model_validate({})
    nc = await nats.connect(url)
    try:
        await ensure_streams(nc, config)
        js = nc.jetstream()
        seqs: dict[int, int] = {}
        probe = studies // 2
        for s in range(studies):
            for k in range(instances):
                ev = _event(s, k, f"first-{s}-{k}")
                ack = await js.publish(ev.subject(), ev.model_dump_json().encode(), headers={"Nats-Msg-Id": ev.msg_id()})
                if s == probe:
                    seqs[k] = ack.seq
        name, partitions = config.stream.name, config.stream.partitions
        new, resend = [], []
        for k in range(instances):
            sop = f"1.2.826.0.1.{probe}.1.{k}"
            t0 = time.perf_counter()
            found = await earlier_digests(nc, name, partitions, f"1.2.826.0.1.{probe}", sop, seqs[k])
            new.append(time.perf_counter() - t0)
            assert found == []
            t0 = time.perf_counter()  # as a resend received after every event so far
            found = await earlier_digests(nc, name, partitions, f"1.2.826.0.1.{probe}", sop, 1 << 62)
            resend.append(time.perf_counter() - t0)
            assert found == [f"{k:064x}"]
        return {"events": studies * instances, "lookups": instances,
                "new_instance_ms": {"p50": _ms(new, 0.5), "p95": _ms(new, 0.95)},
                "resend_ms": {"p50": _ms(resend, 0.5), "p95": _ms(resend, 0.95)}}
    finally:
        await nc.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=20, help="studies in the stream")
    ap.add_argument("--instances", type=int, default=1000, help="instances per study (each looked up in one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-versions-") as tmp:
        server = NatsServer(Path(tmp) / "nats", free_port(), free_port(), name="bench",
                            log_file=Path(tmp) / "nats.log").start()
        try:
            result = asyncio.run(run(server.url, args.studies, args.instances))
        finally:
            server.kill()
    print(f"router history lookups beside {result['events']} events: new instance p50 "
          f"{result['new_instance_ms']['p50']} ms p95 {result['new_instance_ms']['p95']} ms; resend p50 "
          f"{result['resend_ms']['p50']} ms p95 {result['resend_ms']['p95']} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
