"""Event schemas of the router: forward jobs on the per-target queues, dead letters, and the study
events integrations subscribe to (complete, updated, routed, forward failed).

Like :mod:`shared.events`, fields are only ever added. The instance bytes never travel: a forward
job carries the claim-check (backend + digest) of the instance it sends.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from .events import SCHEMA_VERSION


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    schema_version: int = SCHEMA_VERSION


class ForwardJob(_Event):
    """``router.out.<target>.<study>.<sop>``: send one instance to one target (a per-target work queue)."""

    target: str
    group: str = Field("", description="target group the target was chosen from (empty: named directly)")
    rule: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    digest: str
    size: int
    backend: str

    def msg_id(self) -> str:
        """De-duplication id: one instance's bytes once per target."""
        return f"out:{self.target}:{self.sop_uid}:{self.digest[:24]}"


class DeadLetter(_Event):
    """``dicom.dlq.<target>.<study>.<sop>``: a forward that failed max_attempts times, or a quarantined instance."""

    job: ForwardJob
    reason: str
    attempts: int
    failed_at: datetime


class SeriesSummary(BaseModel):
    """One series of a study as the router saw it."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    series_uid: str
    instances: int
    description: str = ""
    modality: str = ""


class StudyComplete(_Event):
    """``dicom.study.complete.<study>`` (first completion) and ``dicom.study.updated.<study>`` (after a re-open).

    Exactly once per study generation across the cluster (Nats-Msg-Id = study UID + generation).
    """

    study_uid: str
    generation: int
    reason: str = Field(description="quiet (quiet period after the last instance, conditions met) or forced")
    incomplete: bool = Field(False, description="forced before the required series arrived")
    discarded: bool = Field(False, description="forced with force_action=discard: on-complete forwards were not made")
    instances: int
    series: list[SeriesSummary]
    patient_id: str = ""
    accession_number: str = ""
    calling_ae: str = ""
    institution_name: str = ""
    first_arrival: datetime
    last_arrival: datetime
    completed_at: datetime

    def msg_id(self) -> str:
        """De-duplication id: one event per study generation."""
        return f"complete:{self.study_uid}:{self.generation}"


class StudyRouted(_Event):
    """``dicom.study.routed.<study>``: a study was assigned a destination (sticky for a target group)."""

    study_uid: str
    target: str
    group: str = ""
    rule: str
    reassigned_from: str = ""
    routed_at: datetime


class ForwardFailed(_Event):
    """``dicom.forward.failed.<target>.<study>``: an instance gave up after max_attempts (now in DICOM_DLQ)."""

    target: str
    study_uid: str
    sop_uid: str
    reason: str
    attempts: int
    failed_at: datetime
