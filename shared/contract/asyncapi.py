"""The AsyncAPI document of every subject dicomflow publishes, generated from the event models.

Integrators read this document (``dicomflow asyncapi``), not our source; because it is generated
from the channels the same models declare (:mod:`shared.contract.events`) and the stream names of
the configuration, it cannot drift from what the services publish. FastStream builds the AsyncAPI
3.0 structure from publisher declarations; no connection is made.
"""

from __future__ import annotations

from shared.config import StreamConfig
from shared.contract.events import EVENT_MODELS, Channel, Event
from shared.contract.subjects import CHANGE_SUBJECTS, CHANGES_STREAM, stream_names


def channels() -> list[tuple[Channel, type[Event]]]:
    """Every channel with the model of its body."""
    return [(ch, model) for model in EVENT_MODELS for ch in model.channels]


def in_change_feed(channel: Channel) -> bool:
    """Whether the server copies this channel's events into the change feed (DICOM_CHANGES)."""
    return any(channel.address.startswith(subject.removesuffix(">")) for subject in CHANGE_SUBJECTS)


def asyncapi(servers: list[str], version: str, streams: StreamConfig) -> str:
    """The AsyncAPI 3.0 document (JSON) of every channel."""
    from faststream.nats import NatsBroker
    from faststream.specification import AsyncAPI

    names = stream_names(streams)
    broker = NatsBroker(servers)
    for ch, model in channels():
        kept = f"JetStream stream {names[ch.stream]}"
        if in_change_feed(ch):
            kept += (f"; copied by the server into {CHANGES_STREAM}, the change feed, whose stream sequence is the "
                     "feed's Sequence (GET /changefeed, dicomflow events)")
        broker.publisher(ch.address, schema=model, title=ch.title, description=f"{ch.description} ({kept})")
    spec = AsyncAPI(broker, title="dicomflow", version=version, schema_version="3.0.0",
                    description="Events of the dicomflow DICOM platform over NATS JetStream.")
    return spec.to_specification().to_json()
