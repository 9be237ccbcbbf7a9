"""Every NATS subject, stream and KV bucket dicomflow uses, in one place.

UIDs travel as subject tokens with ``.`` replaced by ``_`` and any other character than a letter or digit
as ``-`` and two hex digits (:func:`shared.contract.uids.uid_token`), after validation, so no UID can inject
a wildcard or an extra token, and two UIDs never share a token. Target names are
configuration-validated tokens (letters, digits, ``-``, ``_``). The event models of
:mod:`shared.contract.events` build their subjects here, and the AsyncAPI document its addresses.
"""

from __future__ import annotations

from shared.config import StreamConfig
from shared.contract.uids import uid_token

IN_PREFIX = "dicom.in"
PART_PREFIX = "dicom.part"
STORED_PREFIX = "dicom.stored"
REJECTED_PREFIX = "dicom.rejected"
STUDY_COMPLETE_PREFIX = "dicom.study.complete"
STUDY_UPDATED_PREFIX = "dicom.study.updated"
STUDY_ROUTED_PREFIX = "dicom.study.routed"
FORWARD_FAILED_PREFIX = "dicom.forward.failed"
OUT_PREFIX = "router.out"
DLQ_PREFIX = "dicom.dlq"
AUDIT_PREFIX = "dicom.audit"
DELETED_PREFIX = "dicom.deleted"

OUT_STREAM = "ROUTER_OUT"
DLQ_STREAM = "DICOM_DLQ"
AUDIT_STREAM = "DICOM_AUDIT"
CHANGES_STREAM = "DICOM_CHANGES"
QUARANTINE = "_quarantine"  # pseudo-target of quarantined instances in the DLQ

STUDIES_BUCKET = "router-studies"
ASSIGN_BUCKET = "router-assign"
HEALTH_BUCKET = "router-health"

NS = 1_000_000_000


def instance_in(study_uid: str, sop_uid: str) -> str:
    """Subject the ingest publishes an :class:`~shared.contract.events.InstanceReceived` to."""
    return f"{IN_PREFIX}.{uid_token(study_uid)}.{uid_token(sop_uid)}"


def partition_filter(partition: int) -> str:
    """Filter subject of one partition's consumers (the stream stores ``dicom.part.<P>.<study>.<sop>``)."""
    return f"{PART_PREFIX}.{partition}.>"


def partition_from_subject(subject: str) -> int:
    """The partition number of a stored (transformed) subject."""
    return int(subject.split(".")[2])


def instance_stored(study_uid: str, sop_uid: str) -> str:
    """Subject of :class:`~shared.contract.events.InstanceStored`."""
    return f"{STORED_PREFIX}.{uid_token(study_uid)}.{uid_token(sop_uid)}"


def instance_rejected(study_uid: str, sop_uid: str) -> str:
    """Subject of :class:`~shared.contract.events.InstanceRejected`."""
    return f"{REJECTED_PREFIX}.{uid_token(study_uid)}.{uid_token(sop_uid)}"


def instance_deleted(study_uid: str, sop_uid: str) -> str:
    """Subject of :class:`~shared.contract.events.InstanceDeleted`."""
    return f"{DELETED_PREFIX}.{uid_token(study_uid)}.{uid_token(sop_uid)}"


def forward_job(target: str, study_uid: str, sop_uid: str) -> str:
    """Subject of a :class:`~shared.contract.events.ForwardJob` in the target's queue."""
    return f"{OUT_PREFIX}.{target}.{uid_token(study_uid)}.{uid_token(sop_uid)}"


def target_filter(target: str) -> str:
    """Filter subject of one target's queue consumer."""
    return f"{OUT_PREFIX}.{target}.>"


def forward_durable(target: str) -> str:
    """The durable consumer that feeds one target's forwarders."""
    return f"fwd-{target}"


def dead_letter(target: str, study_uid: str, sop_uid: str) -> str:
    """Subject of a :class:`~shared.contract.events.DeadLetter`."""
    return f"{DLQ_PREFIX}.{target}.{uid_token(study_uid)}.{uid_token(sop_uid)}"


def dead_letter_filter(target: str | None = None, study_uid: str | None = None) -> str:
    """Filter over the dead-letter stream: one target's and/or one study's entries, or all of them."""
    return f"{DLQ_PREFIX}.{target or '*'}.{uid_token(study_uid) if study_uid else '*'}.*"


def study_complete(study_uid: str) -> str:
    """Subject of a study's first :class:`~shared.contract.events.StudyComplete`."""
    return f"{STUDY_COMPLETE_PREFIX}.{uid_token(study_uid)}"


def study_updated(study_uid: str) -> str:
    """Subject of a :class:`~shared.contract.events.StudyComplete` after the study re-opened."""
    return f"{STUDY_UPDATED_PREFIX}.{uid_token(study_uid)}"


def study_routed(study_uid: str) -> str:
    """Subject of :class:`~shared.contract.events.StudyRouted`."""
    return f"{STUDY_ROUTED_PREFIX}.{uid_token(study_uid)}"


def forward_failed(target: str, study_uid: str) -> str:
    """Subject of :class:`~shared.contract.events.ForwardFailed`."""
    return f"{FORWARD_FAILED_PREFIX}.{target}.{uid_token(study_uid)}"


def audit(event: str, outcome: str) -> str:
    """Subject of an :class:`~shared.contract.events.AuditRecord`: its kind and its outcome (both fixed words)."""
    return f"{AUDIT_PREFIX}.{event}.{outcome}"


def audit_filter(event: str | None = None, outcome: str | None = None) -> str:
    """Filter over the audit stream: one kind and/or one outcome of audit record, or all of them."""
    return f"{AUDIT_PREFIX}.{event or '*'}.{outcome or '*'}"


#: The event subjects that are changes to the archive, each copied from the events stream into the change
#: feed (DICOM_CHANGES) by the server, in its order. A new kind of change is one more line here (its subject
#: must be in the events stream) and a reader for its model in :mod:`shared.changefeed.entries`. Each subject is its own source of the feed, so
#: adding one neither copies the others again nor moves their cursors.
CHANGE_SUBJECTS: tuple[str, ...] = (
    f"{STORED_PREFIX}.>",
    f"{STUDY_COMPLETE_PREFIX}.>",
    f"{STUDY_UPDATED_PREFIX}.>",
    f"{DELETED_PREFIX}.>",
)


def stream_names(cfg: StreamConfig) -> dict[str, str]:
    """The JetStream stream of each stream role (the instance and events streams are named in the configuration)."""
    return {"instances": cfg.name, "events": cfg.events_name, "forward": OUT_STREAM, "dlq": DLQ_STREAM,
            "audit": AUDIT_STREAM, "changes": CHANGES_STREAM}


def stream_config(name: str, subjects: list[str], cfg: StreamConfig, max_age_days: float,
                  retention: str = "limits", **extra) -> dict:
    """Raw JetStream config of one of our streams: file storage, events of at most 64 KiB (claim-checks,
    never instance bytes), replicas and de-duplication window from the configuration."""
    return {
        "name": name,
        "subjects": subjects,
        **extra,
        "retention": retention,
        "storage": "file",
        "num_replicas": cfg.replicas,
        "duplicate_window": int(cfg.duplicate_window_s * NS),
        "max_age": int(max_age_days * 86400 * NS),
        "max_msg_size": 65536,
        "discard": "old",
    }


def instance_stream_config(cfg: StreamConfig) -> dict:
    """Raw JetStream config of the partitioned instance stream (the server's partition() does the hashing)."""
    return stream_config(cfg.name, [f"{IN_PREFIX}.*.*"], cfg, cfg.max_age_days, subject_transform={
        "src": f"{IN_PREFIX}.*.*",
        "dest": f"{PART_PREFIX}.{{{{partition({cfg.partitions},1)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}",
    })


def events_stream_config(cfg: StreamConfig) -> dict:
    """Raw JetStream config of the integration events stream."""
    return stream_config(cfg.events_name,
                         [f"{STORED_PREFIX}.>", f"{REJECTED_PREFIX}.>", "dicom.study.>", "dicom.forward.>",
                          f"{DELETED_PREFIX}.>"],
                         cfg, cfg.events_max_age_days)


def out_stream_config(cfg: StreamConfig) -> dict:
    """The forward queues: a work queue, one non-overlapping consumer per target."""
    return stream_config(OUT_STREAM, [f"{OUT_PREFIX}.>"], cfg, cfg.max_age_days, retention="workqueue")


def dlq_stream_config(cfg: StreamConfig) -> dict:
    """The dead-letter stream: kept until replayed (deleted then) or aged out with the events."""
    return stream_config(DLQ_STREAM, [f"{DLQ_PREFIX}.>"], cfg, cfg.events_max_age_days)


def audit_stream_config(cfg: StreamConfig, max_age_days: float) -> dict:
    """The audit trail: every audit record, kept ``audit.max_age_days`` (years, not the events' days)."""
    return stream_config(AUDIT_STREAM, [f"{AUDIT_PREFIX}.>"], cfg, max_age_days)


def changes_stream_config(cfg: StreamConfig, max_age_days: float) -> dict:
    """The change feed: no subjects of its own, the server copies every change event of the events stream into
    it (one source per subject of :data:`CHANGE_SUBJECTS`), so its stream sequence is the feed's Sequence,
    dense and never reused, and it is kept ``changefeed.max_age_days`` whatever the events stream keeps."""
    config = stream_config(CHANGES_STREAM, [], cfg, max_age_days,
                           sources=[{"name": cfg.events_name, "filter_subject": subject} for subject in CHANGE_SUBJECTS])
    del config["subjects"]  # a stream fed only by its sources has none (an empty list is not the same to the server)
    return config
