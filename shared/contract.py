"""The AsyncAPI document of every subject dicomflow publishes, generated from the event models.

Integrators read this document (``dicomflow asyncapi``), not our source; because it is generated
from the same pydantic models the services publish, it cannot drift from them. FastStream builds
the AsyncAPI 3.0 structure from publisher declarations; no connection is made.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from . import events


@dataclass(frozen=True)
class Channel:
    """One subject family: its address template, payload model and meaning."""

    title: str
    address: str
    model: type[BaseModel]
    description: str
    stream: str


CHANNELS: list[Channel] = [
    Channel("instance-received", "dicom.in.{study}.{sop}", events.InstanceReceived,
            "An instance's bytes are durable in the staging backend (claim-check: backend + blake3 digest). Published "
            "by the ingest before it answers the modality; stored partitioned as dicom.part.{partition}.{study}.{sop}. "
            "Nats-Msg-Id = in:<SOPInstanceUID>:<digest prefix>. UIDs appear in subjects with '.' replaced by '_'.",
            "DICOM"),
    Channel("instance-stored", "dicom.stored.{study}.{sop}", events.InstanceStored,
            "An instance is stored on every placement of its institution's policy and indexed.", "DICOM_EVENTS"),
    Channel("instance-rejected", "dicom.rejected.{study}.{sop}", events.InstanceRejected,
            "The store could not place an instance (e.g. no placement policy for its institution).", "DICOM_EVENTS"),
]


def asyncapi(servers: list[str], version: str) -> str:
    """The AsyncAPI 3.0 document (JSON) of every channel."""
    from faststream.nats import NatsBroker
    from faststream.specification import AsyncAPI

    broker = NatsBroker(servers)
    for ch in CHANNELS:
        broker.publisher(ch.address, schema=ch.model, title=ch.title,
                         description=f"{ch.description} (JetStream stream {ch.stream})")
    spec = AsyncAPI(broker, title="dicomflow", version=version, schema_version="3.0.0",
                    description="Events of the dicomflow DICOM platform over NATS JetStream.")
    return spec.to_specification().to_json()
