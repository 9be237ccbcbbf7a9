"""The AsyncAPI document of every subject dicomflow publishes, generated from the event models.

Integrators read this document (``dicomflow asyncapi``), not our source; because it is generated
from the same pydantic models the services publish, it cannot drift from them. FastStream builds
the AsyncAPI 3.0 structure from publisher declarations; no connection is made.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from . import events, routing_events


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
    Channel("study-complete", "dicom.study.complete.{study}", routing_events.StudyComplete,
            "A study is complete (quiet period after its last instance and its required series, or forced), once per "
            "study across the cluster: Nats-Msg-Id = complete:<StudyInstanceUID>:<generation>.", "DICOM_EVENTS"),
    Channel("study-updated", "dicom.study.updated.{study}", routing_events.StudyComplete,
            "Instances arrived after a study completed (it re-opened); the next generation completed. Same body.",
            "DICOM_EVENTS"),
    Channel("study-routed", "dicom.study.routed.{study}", routing_events.StudyRouted,
            "A study was given a destination (for a target group: its sticky member; again when moved whole).",
            "DICOM_EVENTS"),
    Channel("forward-failed", "dicom.forward.failed.{target}.{study}", routing_events.ForwardFailed,
            "An instance gave up after router.forward.max_attempts; it waits in DICOM_DLQ (dicomflow dlq replay).",
            "DICOM_EVENTS"),
    Channel("forward-job", "router.out.{target}.{study}.{sop}", routing_events.ForwardJob,
            "The router's per-target work queue: one instance to send to one target.", "ROUTER_OUT"),
    Channel("dead-letter", "dicom.dlq.{target}.{study}.{sop}", routing_events.DeadLetter,
            "A forward that failed max_attempts times, or an instance quarantined by a rule (target _quarantine).",
            "DICOM_DLQ"),
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
