"""Reading a study's instance events back from the partitioned instance stream.

The stream keeps every InstanceReceived (limits retention), so a study's instances need no second
copy: on completion (``when: complete`` rules) or when a whole study moves to another gateway,
the router walks ``dicom.part.<P>.<study>.*`` with STREAM.MSG.GET next_by_subj, from a sequence on.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

from nats.aio.client import Client as NATS

from shared.bus.jetstream import JetStreamAPIError, api
from shared.bus.partitioning import partition_of
from shared.contract import subjects
from shared.contract.events import InstanceReceived
from shared.contract.uids import uid_token

NO_MESSAGE = 10037


def study_filter(study_uid: str, partitions: int) -> str:
    """The stored subjects of every instance of one study."""
    return f"{subjects.PART_PREFIX}.{partition_of(study_uid, partitions)}.{uid_token(study_uid)}.*"


def instance_filter(study_uid: str, sop_uid: str, partitions: int) -> str:
    """The stored subject of every event of one instance of a study."""
    return f"{subjects.PART_PREFIX}.{partition_of(study_uid, partitions)}.{uid_token(study_uid)}.{uid_token(sop_uid)}"


async def study_events(nc: NATS, stream: str, partitions: int, study_uid: str,
                       after_seq: int = 0) -> AsyncIterator[tuple[int, InstanceReceived]]:
    """(stream sequence, event) of every instance of the study stored after ``after_seq``, in order."""
    async for found in _events(nc, stream, study_filter(study_uid, partitions), after_seq):
        yield found


async def earlier_digests(nc: NATS, stream: str, partitions: int, study_uid: str, sop_uid: str,
                          before_seq: int, tenant: str = "") -> list[str]:
    """The digests of the instance's events of ``tenant`` stored before ``before_seq``, oldest first (usually
    none: one stream lookup by the subject index)."""
    out = []
    async for seq, event in _events(nc, stream, instance_filter(study_uid, sop_uid, partitions), 0):
        if seq >= before_seq:
            break
        if event.tenant == tenant:
            out.append(event.digest)
    return out


async def _events(nc: NATS, stream: str, filt: str, after_seq: int) -> AsyncIterator[tuple[int, InstanceReceived]]:
    seq = after_seq + 1
    while True:
        try:
            resp = await api(nc, f"STREAM.MSG.GET.{stream}", {"seq": seq, "next_by_subj": filt})
        except JetStreamAPIError as exc:
            if exc.err_code == NO_MESSAGE or exc.code == 404:
                return
            raise
        msg = resp["message"]
        found = int(msg["seq"])
        try:
            yield found, InstanceReceived.model_validate_json(base64.b64decode(msg.get("data") or b""))
        except ValueError:
            pass  # undecodable: the instance handler logged it when it first arrived
        seq = found + 1
