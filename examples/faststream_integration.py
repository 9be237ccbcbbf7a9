"""An integration as a FastStream application: it is told of every stored instance and every completed study,
with the event models of dicomflow's contract as typed message bodies, and resumes where it left off after a
restart (its durable consumers on the events stream keep its place).

Run it with ``python examples/faststream_integration.py``. NATS_URL names the server (default
nats://127.0.0.1:4222; with the integration user's credentials where the server has users:
nats://integration:<password>@host:4222), DICOMFLOW_EVENTS_STREAM the events stream (default DICOM_EVENTS).
Each event is printed as one JSON line; a real integration would update a worklist, a FHIR server, a billing
system. Make the handlers idempotent: an event whose acknowledgement was lost (the process killed between the
handler and the ack) is delivered again.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from faststream import AckPolicy, FastStream
from faststream.nats import JStream, NatsBroker, PullSub
from nats.js.api import ConsumerConfig, DeliverPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the contract, where dicomflow is not installed
from shared.contract.events import InstanceStored, StudyComplete  # noqa: E402

broker = NatsBroker(os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
app = FastStream(broker)
# dicomflow's services declare the stream; an integration only reads it
events = JStream(os.environ.get("DICOMFLOW_EVENTS_STREAM", "DICOM_EVENTS"), declare=False)


def durable(name: str) -> dict:
    """A durable pull consumer of ours, from the stream's start on first use, one event at a time (in order);
    an event is acknowledged after its handler returned, and delivered again after a failure."""
    return dict(stream=events, durable=name, pull_sub=PullSub(batch_size=1, timeout=1.0),
                ack_policy=AckPolicy.NACK_ON_ERROR, deliver_policy=DeliverPolicy.ALL,
                config=ConsumerConfig(ack_wait=30, max_ack_pending=1))


@broker.subscriber("dicom.stored.*.*", **durable("example-stored"))
async def instance_stored(event: InstanceStored) -> None:
    """An instance is stored on every placement of its tenant's policy."""
    print(json.dumps({"event": "stored", "tenant": event.tenant, "study": event.tags.study_uid,
                      "sop": event.tags.sop_uid, "digest": event.digest,
                      "replaced": event.replaced_digest is not None}), flush=True)


@broker.subscriber("dicom.study.complete.*", **durable("example-complete"))
async def study_complete(event: StudyComplete) -> None:
    """A study is complete (its first generation; dicom.study.updated.* carries the later ones)."""
    print(json.dumps({"event": "complete", "study": event.study_uid, "instances": event.instances,
                      "generation": event.generation}), flush=True)


if __name__ == "__main__":
    asyncio.run(app.run())
