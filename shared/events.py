"""Event schemas: the contract of every NATS subject dicomflow publishes.

Each model is the JSON body of one subject family (see :mod:`shared.subjects`). Events are small
(about 1 KiB): the instance bytes never travel on the bus, only a claim-check (backend + digest).
Fields are only ever added, never renamed, so integrations keep working across versions.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


def utcnow() -> datetime:
    """Timezone-aware now, the timestamp format of every event."""
    return datetime.now(UTC)


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    schema_version: int = SCHEMA_VERSION


class InstanceTags(BaseModel):
    """The routing tags read from an instance (nothing else is parsed)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str = ""
    patient_id: str = ""
    modality: str = ""
    institution_name: str = ""
    body_part: str = ""
    series_description: str = ""
    study_description: str = ""
    accession_number: str = ""
    series_number: int | None = None
    instance_number: int | None = None


class InstanceReceived(_Event):
    """``dicom.in.<study>.<sop>``: an instance was received, its bytes are durable in the staging backend."""

    tags: InstanceTags
    transfer_syntax_uid: str
    digest: str = Field(description="blake3 hex digest of the data set bytes as received (no file meta)")
    size: int
    backend: str = Field(description="staging backend that holds the bytes, addressed by digest")
    calling_ae: str
    called_ae: str
    received_at: datetime
    receiver: str = Field("", description="host/pid of the receiving process")

    def msg_id(self) -> str:
        """De-duplication id: the same bytes of the same SOP instance are one event."""
        return f"in:{self.tags.sop_uid}:{self.digest[:32]}"


class InstanceStored(_Event):
    """``dicom.stored.<study>.<sop>``: an instance is stored according to its placement policy."""

    tags: InstanceTags
    transfer_syntax_uid: str
    digest: str
    size: int
    policy: str
    placements: list[str]
    calling_ae: str
    stored_at: datetime
    replaced_digest: str | None = Field(None, description="digest of an earlier, different version of this SOP instance")

    def msg_id(self) -> str:
        """De-duplication id of the stored event."""
        return f"stored:{self.tags.sop_uid}:{self.digest[:32]}"


class InstanceRejected(_Event):
    """``dicom.rejected.<study>.<sop>``: the store could not place an instance (e.g. no policy)."""

    tags: InstanceTags
    digest: str
    reason: str
    rejected_at: datetime
