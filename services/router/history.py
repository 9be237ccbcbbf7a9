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


async def study_events(nc: NATS, stream: str, partitions: int, study_uid: str,
                       after_seq: int = 0) -> AsyncIterator[tuple[int, InstanceReceived]]:
    """(stream sequence, event) of every instance of the study stored after ``after_seq``, in order."""
    filt = study_filter(study_uid, partitions)
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
