"""Publishing the ``dicom.deleted`` events of a deletion (asyncio: the web service, the store, the CLI)."""

from __future__ import annotations

import asyncio
import logging

from nats.js import JetStreamContext

from shared.bus.publish import AsyncPublisher
from shared.contract.events import InstanceDeleted

log = logging.getLogger("dicomflow.deletion")


async def announce(js: JetStreamContext, events: list[InstanceDeleted], timeout: float) -> int:
    """Publish every event, their PubAcks awaited together; the number that could not be published (logged).

    Each has a Nats-Msg-Id of its instance, digest and deletion time: a retried publish of the same event is
    one message in the stream, a later deletion of the same bytes another.
    """
    publisher = AsyncPublisher(js, timeout)
    failed = 0
    for start in range(0, len(events), 500):  # bounded PubAcks in flight
        results = await asyncio.gather(*(publisher.publish(e) for e in events[start:start + 500]),
                                       return_exceptions=True)
        for event, res in zip(events[start:start + 500], results, strict=True):
            if isinstance(res, BaseException):
                failed += 1
                log.error("deleted event of %s not published: %s", event.sop_uid, res)
    return failed
