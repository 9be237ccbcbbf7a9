"""Reading the change feed (the DICOM_CHANGES stream) over NATS: a page from a sequence or a time, and the latest
entry. Reading changes nothing: every read is an ephemeral consumer that acknowledges nothing and goes away.

Which entries a caller sees is :mod:`shared.changefeed.entries`' decision; this module only fetches the
messages in sequence order and hands them to it, so another tenant's entry never leaves the process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.client import Client as NATS

from shared.bus.jetstream import JetStreamAPIError, api, delete_consumer, read_batch, reading_consumer
from shared.config import AccessConfig
from shared.contract.subjects import CHANGES_STREAM

from .entries import Change, NotAChange, change_of, select, visible

log = logging.getLogger("dicomflow.changefeed")

BATCH = 512


@dataclass(frozen=True)
class Bounds:
    """The feed's first and last kept sequences (0, 0: nothing yet, or no feed stream yet)."""

    first: int
    last: int


@dataclass(frozen=True)
class Read:
    """A page of changes, and the last sequence looked at (a follower goes on after it, past other tenants')."""

    changes: list[Change]
    through: int


async def bounds(nc: NATS) -> Bounds:
    """The sequences the feed holds now."""
    try:
        info = await api(nc, f"STREAM.INFO.{CHANGES_STREAM}")
    except JetStreamAPIError as exc:
        if exc.err_code == 10059:  # not declared yet: no service has started, nothing has changed
            return Bounds(0, 0)
        raise
    state = info["state"]
    if not state.get("messages"):
        return Bounds(0, 0)
    return Bounds(state["first_seq"], state["last_seq"])


def _decode(msg, access: AccessConfig) -> Change | None:
    try:
        return change_of(msg.metadata.sequence.stream, msg.subject, msg.data, access)
    except NotAChange as exc:  # a kind this version does not know: skipped, as every reader of events does
        log.debug("change feed: %s", exc)
        return None


async def read(nc: NATS, access: AccessConfig, scope: str | None, limit: int, start: int = 1,
               since: datetime | None = None) -> Read:
    """Up to ``limit`` changes the caller (``scope``: a tenant; None: an administrator) may see, in sequence
    order, from sequence ``start`` on, or from time ``since`` on (the stream's time finds the place; the
    change's own time decides). Stops at the last entry there was when it began."""
    b = await bounds(nc)
    if b.last == 0 or start > b.last:
        return Read([], start - 1)
    if since is not None:
        consumer = await reading_consumer(nc, CHANGES_STREAM,
                                          start_time=since.astimezone(UTC).isoformat().replace("+00:00", "Z"))
    else:
        consumer = await reading_consumer(nc, CHANGES_STREAM, start_seq=max(start, b.first))
    out: list[Change] = []
    through = max(start, b.first) - 1 if since is None else start - 1  # by time: no place known yet
    try:
        while len(out) < limit and through < b.last:
            # an administrator's page is the next entries; a tenant's may skip many of others': full pulls
            want = BATCH if scope is not None else min(BATCH, limit - len(out))
            msgs = await read_batch(nc, CHANGES_STREAM, consumer, want)
            if not msgs:
                break
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                if seq > b.last:
                    break
                through = seq
                change = _decode(msg, access)
                if change is not None and select([change], scope, 1, since):
                    out.append(change)
                    if len(out) == limit:
                        break
    finally:
        await delete_consumer(nc, CHANGES_STREAM, consumer)
    return Read(out, through)


async def latest(nc: NATS, access: AccessConfig, scope: str | None, window: int = 256) -> Change | None:
    """The newest change the caller may see (None: none), looking back from the end a window at a time."""
    b = await bounds(nc)
    end = b.last
    while end >= b.first and end > 0:
        start = max(b.first, end - window + 1)
        page = await read(nc, access, scope, window, start)
        seen = [c for c in page.changes if c.sequence <= end and visible(c, scope)]
        if seen:
            return seen[-1]
        end = start - 1
    return None
