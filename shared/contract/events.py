"""Event schemas: the contract of every NATS subject dicomflow publishes.

Each model is the JSON body of one subject family and declares it: its channels (address template,
stream, meaning), :meth:`Event.subject` (the concrete subject, from :mod:`shared.contract.subjects`)
and :meth:`Event.msg_id` (the ``Nats-Msg-Id`` JetStream de-duplicates on). The AsyncAPI document is
generated from these declarations (:mod:`shared.contract.asyncapi`), so it cannot drift from what the
services publish. Events are small (about 1 KiB): the instance bytes never travel on the bus, only a
claim-check (backend + digest). Fields are only ever added, never renamed, so integrations keep
working across versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.contract import subjects as s

SCHEMA_VERSION = 1

StreamRole = Literal["instances", "events", "forward", "dlq", "audit"]


def utcnow() -> datetime:
    """Timezone-aware now, the timestamp format of every event."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Channel:
    """One subject family of an event model: its address template, the stream that keeps it, its meaning."""

    title: str
    address: str
    stream: StreamRole
    description: str


class Event(BaseModel):
    """The base of every event: frozen, unknown fields ignored (a newer producer adds fields), versioned."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    schema_version: int = SCHEMA_VERSION
    channels: ClassVar[tuple[Channel, ...]] = ()

    def subject(self) -> str:
        """The subject this event is published on."""
        raise NotImplementedError(f"{type(self).__name__} declares no subject")

    def msg_id(self) -> str:
        """The ``Nats-Msg-Id``: a republished event (a redelivery, a retry) is one message in the stream."""
        raise NotImplementedError(f"{type(self).__name__} declares no message id")


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


def _tenant_part(tenant: str) -> str:
    """The tenant's part of a message id: two tenants' instances with the same UID and bytes are two
    messages (JetStream would otherwise drop the second as a duplicate). None before tenants existed."""
    return f"{tenant}:" if tenant else ""


class InstanceReceived(Event):
    """``dicom.in.<study>.<sop>``: an instance was received, its bytes are durable in the staging backend."""

    channels = (Channel(
        "instance-received", f"{s.IN_PREFIX}.{{study}}.{{sop}}", "instances",
        "An instance's bytes are durable in the staging backend (claim-check: backend + blake3 digest). Published "
        f"by the ingest before it answers the modality; stored partitioned as {s.PART_PREFIX}.{{partition}}.{{study}}"
        ".{sop}. Nats-Msg-Id = in:<tenant>:<SOPInstanceUID>:<digest prefix>:<receipt>: every receipt of an instance "
        "is an event (the consumers tell a resend from a new version), a retried publish of one receipt is one. "
        "UIDs appear in subjects with '.' replaced by '_' (and any character other than a letter or digit as '-' "
        "and its two hex digits)."),)
    tags: InstanceTags
    transfer_syntax_uid: str
    digest: str = Field(description="blake3 hex digest of the data set bytes as received (no file meta)")
    size: int
    backend: str = Field(description="staging backend that holds the bytes, addressed by digest")
    calling_ae: str
    called_ae: str
    received_at: datetime
    receiver: str = Field("", description="host/pid of the receiving process")
    tenant: str = Field("", description="the institution the instance belongs to, from who sent it (the calling AE; "
                                        "InstitutionName only through a trusted gateway). Empty in events of "
                                        "versions before tenants: the store derives it the same way")
    receipt: str = Field("", description="unique id of this receipt of the instance (a retried publish keeps it). "
                                         "Empty in events of versions before it")

    def subject(self) -> str:
        return s.instance_in(self.tags.study_uid, self.tags.sop_uid)

    def msg_id(self) -> str:
        """De-duplication id: one receipt is one event, however often its publish is retried.

        Not the bytes alone: the same SOP instance received as version A, then B, then A again must be
        three events (the last answered with success wins), where an id of SOP + digest made JetStream drop
        the third as a duplicate of the first. Telling a resend of the same bytes from a new version is the
        consumers' business (the catalogue's versions, the router's study memory), whatever the time between.
        """
        receipt = f":{self.receipt}" if self.receipt else ""
        return f"in:{_tenant_part(self.tenant)}{self.tags.sop_uid}:{self.digest[:32]}{receipt}"


class InstanceStored(Event):
    """``dicom.stored.<study>.<sop>``: an instance is stored according to its placement policy."""

    channels = (Channel("instance-stored", f"{s.STORED_PREFIX}.{{study}}.{{sop}}", "events",
                        "An instance is stored on every placement of its institution's policy and indexed."),)
    tags: InstanceTags
    transfer_syntax_uid: str
    digest: str
    size: int
    policy: str
    placements: list[str]
    calling_ae: str
    stored_at: datetime
    replaced_digest: str | None = Field(None, description="digest of an earlier, different version of this SOP "
                                                          "instance: this event replaces it")
    tenant: str = Field("", description="the institution the instance belongs to (see InstanceReceived.tenant)")
    source_seq: int = Field(0, description="stream sequence of the InstanceReceived that brought this version: of "
                                           "two stored events of one instance, the higher is the version held")

    def subject(self) -> str:
        return s.instance_stored(self.tags.study_uid, self.tags.sop_uid)

    def msg_id(self) -> str:
        """One stored event per version received (A, B, A again: three), once however often it is redelivered."""
        version = f":{self.source_seq}" if self.source_seq else ""
        return f"stored:{_tenant_part(self.tenant)}{self.tags.sop_uid}:{self.digest[:32]}{version}"


class InstanceRejected(Event):
    """``dicom.rejected.<study>.<sop>``: the store could not place an instance (e.g. no policy)."""

    channels = (Channel("instance-rejected", f"{s.REJECTED_PREFIX}.{{study}}.{{sop}}", "events",
                        "The store could not place an instance (e.g. no placement policy for its institution)."),)
    tags: InstanceTags
    digest: str
    reason: str
    rejected_at: datetime

    def subject(self) -> str:
        return s.instance_rejected(self.tags.study_uid, self.tags.sop_uid)

    def msg_id(self) -> str:
        return f"rejected:{self.tags.sop_uid}:{self.digest[:32]}"


DeletionReason = Literal["request", "rejection-note", "retention"]
"""Why an instance was deleted: a DICOMweb DELETE or ``dicomflow delete``, a rejection note (a Key Object
Selection Document titled with a rejection code of CID 7010), or the tenant's retention period."""


class InstanceDeleted(Event):
    """``dicom.deleted.<study>.<sop>``: an instance was removed from the catalogue and from its placements."""

    channels = (Channel("instance-deleted", f"{s.DELETED_PREFIX}.{{study}}.{{sop}}", "events",
                        "An instance was deleted: its catalogue entry is gone, and its object from every placement "
                        "unless another instance (any tenant) holds the same bytes. reason is request (DICOMweb "
                        "DELETE, dicomflow delete), rejection-note (a KOS titled with a rejection code of CID 7010) or retention. "
                        "Nats-Msg-Id = deleted:<tenant>:<sop>:<digest prefix>:<deleted_at>."),)
    tenant: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str = ""
    digest: str
    placements: list[str] = Field(default_factory=list, description="the placements the instance was stored in")
    objects_removed: list[str] = Field(default_factory=list, description="the placements whose object was removed "
                                       "(the others still hold bytes another instance shares)")
    reason: DeletionReason
    requested_by: str = Field("", description="who asked: an HTTP principal, an OS user, the rejection note's "
                              "SOP Instance UID, or retention")
    deleted_at: datetime

    def subject(self) -> str:
        return s.instance_deleted(self.study_uid, self.sop_uid)

    def msg_id(self) -> str:
        # deleted_at too: the same bytes stored again and deleted again within the duplicate window are a
        # second deletion, not a duplicate of the first
        return f"deleted:{_tenant_part(self.tenant)}{self.sop_uid}:{self.digest[:32]}:{self.deleted_at.isoformat()}"


class ForwardJob(Event):
    """``router.out.<target>.<study>.<sop>``: send one instance to one target (a per-target work queue)."""

    channels = (Channel("forward-job", f"{s.OUT_PREFIX}.{{target}}.{{study}}.{{sop}}", "forward",
                        "The router's per-target work queue: one instance to send to one target."),)
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
    source_seq: int = Field(0, description="stream sequence of the InstanceReceived this job sends")

    def subject(self) -> str:
        return s.forward_job(self.target, self.study_uid, self.sop_uid)

    def msg_id(self) -> str:
        """De-duplication id: one version received, once per target (the router sends a resend of the same
        bytes nowhere; a version received again after another, A B A, is sent again)."""
        version = f":{self.source_seq}" if self.source_seq else ""
        return f"out:{self.target}:{self.sop_uid}:{self.digest[:24]}{version}"


class DeadLetter(Event):
    """``dicom.dlq.<target>.<study>.<sop>``: a forward that failed max_attempts times, or a quarantined instance."""

    channels = (Channel("dead-letter", f"{s.DLQ_PREFIX}.{{target}}.{{study}}.{{sop}}", "dlq",
                        "A forward that failed max_attempts times, or an instance quarantined by a rule (target "
                        f"{s.QUARANTINE})."),)
    job: ForwardJob
    reason: str
    attempts: int
    failed_at: datetime
    job_sequence: int = Field(0, description="stream sequence of the failed job in ROUTER_OUT (0: quarantined)")

    def subject(self) -> str:
        return s.dead_letter(self.job.target, self.job.study_uid, self.job.sop_uid)

    def msg_id(self) -> str:
        """A quarantine once per instance version; a failed job once per delivery of it to the queue."""
        if self.job.target == s.QUARANTINE:
            return f"quarantine:{self.job.sop_uid}:{self.job.digest[:24]}"
        return f"dlq:{self.job.target}:{self.job.sop_uid}:{self.job.digest[:16]}:{self.job_sequence}"


class SeriesSummary(BaseModel):
    """One series of a study as the router saw it."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    series_uid: str
    instances: int
    description: str = ""
    modality: str = ""


class StudyComplete(Event):
    """``dicom.study.complete.<study>`` (first completion) and ``dicom.study.updated.<study>`` (after a re-open).

    Exactly once per study generation across the cluster (Nats-Msg-Id = study UID + generation).
    """

    channels = (
        Channel("study-complete", f"{s.STUDY_COMPLETE_PREFIX}.{{study}}", "events",
                "A study is complete (quiet period after its last instance and its required series, or forced), once "
                "per study across the cluster: Nats-Msg-Id = complete:<StudyInstanceUID>:<generation>."),
        Channel("study-updated", f"{s.STUDY_UPDATED_PREFIX}.{{study}}", "events",
                "Instances arrived after a study completed (it re-opened); the next generation completed. Same "
                "body."),
    )
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
    tenant: str = Field("", description="the institution the study's instances belong to (see InstanceReceived.tenant; "
                                        "empty in events of versions before it, and where the ingest named none)")
    first_arrival: datetime
    last_arrival: datetime
    completed_at: datetime

    @property
    def kind(self) -> Literal["complete", "updated"]:
        """complete for a study's first generation, updated for every later one."""
        return "complete" if self.generation == 1 else "updated"

    def subject(self) -> str:
        return s.study_complete(self.study_uid) if self.kind == "complete" else s.study_updated(self.study_uid)

    def msg_id(self) -> str:
        """De-duplication id: one event per study generation."""
        return f"complete:{self.study_uid}:{self.generation}"


class StudyRouted(Event):
    """``dicom.study.routed.<study>``: a study was assigned a destination (sticky for a target group)."""

    channels = (Channel("study-routed", f"{s.STUDY_ROUTED_PREFIX}.{{study}}", "events",
                        "A study was given a destination (for a target group: its sticky member; again when moved "
                        "whole)."),)
    study_uid: str
    target: str
    group: str = ""
    rule: str
    reassigned_from: str = ""
    routed_at: datetime

    def subject(self) -> str:
        return s.study_routed(self.study_uid)

    def msg_id(self) -> str:
        return f"routed:{self.study_uid}:{self.target}:{self.reassigned_from}"


class ForwardFailed(Event):
    """``dicom.forward.failed.<target>.<study>``: an instance gave up after max_attempts (now in DICOM_DLQ)."""

    channels = (Channel("forward-failed", f"{s.FORWARD_FAILED_PREFIX}.{{target}}.{{study}}", "events",
                        "An instance gave up after router.forward.max_attempts; it waits in DICOM_DLQ (dicomflow dlq "
                        "replay)."),)
    target: str
    study_uid: str
    sop_uid: str
    reason: str
    attempts: int
    failed_at: datetime
    job_sequence: int = Field(0, description="stream sequence of the failed job in ROUTER_OUT")

    def subject(self) -> str:
        return s.forward_failed(self.target, self.study_uid)

    def msg_id(self) -> str:
        return f"failed:{self.target}:{self.sop_uid}:{self.job_sequence}"


AuditEventKind = Literal["association", "query", "retrieve", "retrieved", "export", "deletion", "dlq-replay",
                         "authentication", "application-start", "configuration-change", "commitment"]
"""What an audit record is about; each maps to a PS3.15 A.5.3 event (:mod:`shared.audit.message` has the codes)."""

AuditOutcome = Literal["success", "minor-failure", "serious-failure", "major-failure"]
"""EventOutcomeIndicator 0, 4, 8 and 12 of PS3.15 A.5.1 (RFC 3881), as words for subjects and filters."""

AuditRole = Literal["source", "destination", "destination-media", "application", "other"]
"""RoleIDCode of an active participant (PS3.15 A.5.2: 110153 Source, 110152 Destination, 110155 Destination
Media, 110150 Application); ``other``: none."""


class AuditParticipant(BaseModel):
    """ActiveParticipant: who took part (a modality's AE, an HTTP caller, an operator, this application)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    user_id: str = Field(description="AE title, API key's tenant, OS user, a folder (export) or the process")
    alternative_user_id: str = Field("", description="e.g. AETITLES=<ae> for DICOM peers, or the process id")
    user_name: str = Field("", description="a person's or system's name where known (a JWT's subject)")
    requestor: bool = Field(description="UserIsRequestor: this participant asked for the action")
    host: str = Field("", description="NetworkAccessPointID: IP address or host name (empty: none)")
    role: AuditRole = "other"


class AuditStudy(BaseModel):
    """ParticipantObjectIdentification of one study: its UID and the SOP classes and instances concerned."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    study_uid: str
    sop_classes: dict[str, int] = Field(default_factory=dict, description="SOP Class UID -> number of instances")
    patient_id: str = ""


class AuditQuery(BaseModel):
    """ParticipantObjectIdentification of a query: the SOP class (or QIDO level) and the query itself."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    sop_class_uid: str = Field(description="C-FIND SOP Class UID; for QIDO-RS the resource searched")
    query: str = Field(description="the query as sent (a C-FIND identifier's keys, a QIDO-RS query string)")
    transfer_syntax_uid: str = ""


class AuditRecord(Event):
    """``dicom.audit.<kind>.<outcome>``: one audited action, the fields of a PS3.15 A.5.1 AuditMessage.

    Rendered as the DICOM audit message XML by :func:`shared.audit.message.audit_message` (and sent as
    such to a syslog audit repository); kept in the ``DICOM_AUDIT`` stream for ``audit.max_age_days``.
    """

    channels = (Channel("audit", f"{s.AUDIT_PREFIX}.{{kind}}.{{outcome}}", "audit",
                        "One audited action (PS3.15 A.5 audit message fields): an association's stores, a query, "
                        "a retrieval, an export, a deletion, a DLQ replay, an authentication failure, a service "
                        "start with its configuration digest, a configuration reloaded, a storage commitment. kind is one "
                        "of association, query, retrieve, export, deletion, dlq-replay, authentication, application-start, "
                        "configuration-change, commitment; outcome one of success, "
                        "minor-failure, serious-failure, major-failure. Nats-Msg-Id = audit:<audit_id>."),)
    audit_id: str = Field(description="unique id of this record (a uuid4, hex)")
    kind: AuditEventKind
    action: Literal["C", "R", "U", "D", "E"] = Field(description="EventActionCode: create, read, update, delete, execute")
    outcome: AuditOutcome
    outcome_description: str = Field("", description="why it failed (EventOutcomeDescription)")
    event_time: datetime = Field(description="when the action ended (an association: its end)")
    started_at: datetime | None = Field(None, description="when it began (an association's A-ASSOCIATE-AC)")
    source_id: str = Field("", description="AuditSourceID: the dicomflow service and host that saw the action")
    participants: list[AuditParticipant] = Field(default_factory=list)
    studies: list[AuditStudy] = Field(default_factory=list)
    query: AuditQuery | None = None
    detail: dict[str, str] = Field(default_factory=dict, description="ParticipantObjectDetail-like facts: counts, "
                                   "reasons, a configuration digest, a replay's target")
    tenant: str = ""

    def subject(self) -> str:
        return s.audit(self.kind, self.outcome)

    def msg_id(self) -> str:
        return f"audit:{self.audit_id}"


#: Every published event model, in the order the AsyncAPI document lists them.
EVENT_MODELS: tuple[type[Event], ...] = (InstanceReceived, InstanceStored, InstanceRejected, StudyComplete,
                                         StudyRouted, ForwardFailed, ForwardJob, DeadLetter, AuditRecord,
                                         InstanceDeleted)
