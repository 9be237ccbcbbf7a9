"""Reading consumer-group lag from JetStream: one CONSUMER.LIST answer gives every partition consumer.

Lag of a partition = ``num_pending`` (stored, not yet delivered) + ``num_ack_pending`` (delivered, not
yet acknowledged), as the consumer leader reports it. The durable of group G on partition P is
``G-pNN`` (:func:`shared.bus.consumer_group.durable_name`).
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterable

from nats.aio.client import Client as NATS
from pydantic import ValidationError

from shared.bus.jetstream import JetStreamAPIError, api
from shared.contract import subjects
from shared.contract.events import InstanceReceived

from .decision import Observation, PartitionLag

log = logging.getLogger("dicomflow.autoscaler")

_DURABLE = re.compile(r"^(?P<group>.+)-p(?P<partition>\d+)$")


async def list_consumers(nc: NATS, stream: str) -> list[dict]:
    """Every consumer info of ``stream`` (CONSUMER.LIST, paged)."""
    out: list[dict] = []
    while True:
        page = await api(nc, f"CONSUMER.LIST.{stream}", {"offset": len(out)})
        got = page.get("consumers") or []
        out.extend(got)
        if not got or len(out) >= page.get("total", 0):
            return out


async def head_institutions(nc: NATS, stream: str, partition: int, after_seq: int) -> tuple[str, ...]:
    """Calling AE and InstitutionName of the first unacknowledged event on ``partition`` (the study in flight)."""
    try:
        got = await api(nc, f"STREAM.MSG.GET.{stream}",
                        {"seq": after_seq + 1, "next_by_subj": subjects.partition_filter(partition)})
        event = InstanceReceived.model_validate_json(base64.b64decode(got["message"]["data"]))
    except (JetStreamAPIError, KeyError, ValidationError, ValueError) as exc:
        log.debug("head of partition %d unreadable: %s", partition, exc)
        return ()
    return tuple(x for x in (event.calling_ae, event.tags.institution_name) if x)


async def read_lag(nc: NATS, stream: str, partitions: int, groups: Iterable[str],
                   with_heads: Iterable[str] = ()) -> dict[str, Observation]:
    """The lag of each group, per partition; groups in ``with_heads`` also get the institutions in flight.

    A group without consumers yet (never started) has an observation with no partitions: lag 0.
    """
    wanted = set(groups)
    heads = set(with_heads)
    rows: dict[str, list[PartitionLag]] = {g: [] for g in wanted}
    for info in await list_consumers(nc, stream):
        m = _DURABLE.match(info.get("name", ""))
        if not m or m["group"] not in wanted or int(m["partition"]) >= partitions:
            continue
        group, p = m["group"], int(m["partition"])
        pending, ack_pending = int(info.get("num_pending", 0)), int(info.get("num_ack_pending", 0))
        institutions: tuple[str, ...] = ()
        if group in heads and pending + ack_pending:
            floor = int((info.get("ack_floor") or {}).get("stream_seq", 0))
            institutions = await head_institutions(nc, stream, p, floor)
        rows[group].append(PartitionLag(p, pending, ack_pending, institutions))
    return {g: Observation(tuple(sorted(r, key=lambda x: x.partition)), partitions) for g, r in rows.items()}
