"""Subjects and streams of the router: per-target forward queues, the dead-letter stream, study events.

Target names are configuration-validated tokens (letters, digits, ``-``, ``_``); UIDs travel as
tokens (:func:`shared.uids.uid_token`).
"""

from __future__ import annotations

from .config import StreamConfig
from .subjects import stream_config
from .uids import uid_token

OUT_STREAM = "ROUTER_OUT"
OUT_PREFIX = "router.out"
DLQ_STREAM = "DICOM_DLQ"
DLQ_PREFIX = "dicom.dlq"
STUDY_COMPLETE_PREFIX = "dicom.study.complete"
STUDY_UPDATED_PREFIX = "dicom.study.updated"
STUDY_ROUTED_PREFIX = "dicom.study.routed"
FORWARD_FAILED_PREFIX = "dicom.forward.failed"
QUARANTINE = "_quarantine"  # pseudo-target of quarantined instances in the DLQ

STUDIES_BUCKET = "router-studies"
ASSIGN_BUCKET = "router-assign"
HEALTH_BUCKET = "router-health"



def forward_job(target: str, study_uid: str, sop_uid: str) -> str:
    """Subject of a :class:`~shared.routing_events.ForwardJob` in the target's queue."""
    return f"{OUT_PREFIX}.{target}.{uid_token(study_uid)}.{uid_token(sop_uid)}"


def target_filter(target: str) -> str:
    """Filter subject of one target's queue consumer."""
    return f"{OUT_PREFIX}.{target}.>"


def forward_durable(target: str) -> str:
    """The durable consumer that feeds one target's forwarders."""
    return f"fwd-{target}"


def dead_letter(target: str, study_uid: str, sop_uid: str) -> str:
    """Subject of a :class:`~shared.routing_events.DeadLetter`."""
    return f"{DLQ_PREFIX}.{target}.{uid_token(study_uid)}.{uid_token(sop_uid)}"


def study_complete(study_uid: str) -> str:
    return f"{STUDY_COMPLETE_PREFIX}.{uid_token(study_uid)}"


def study_updated(study_uid: str) -> str:
    return f"{STUDY_UPDATED_PREFIX}.{uid_token(study_uid)}"


def study_routed(study_uid: str) -> str:
    return f"{STUDY_ROUTED_PREFIX}.{uid_token(study_uid)}"


def forward_failed(target: str, study_uid: str) -> str:
    return f"{FORWARD_FAILED_PREFIX}.{target}.{uid_token(study_uid)}"


def out_stream_config(cfg: StreamConfig) -> dict:
    """The forward queues: a work queue, one non-overlapping consumer per target."""
    return stream_config(OUT_STREAM, [f"{OUT_PREFIX}.>"], cfg, cfg.max_age_days, retention="workqueue")


def dlq_stream_config(cfg: StreamConfig) -> dict:
    """The dead-letter stream: kept until replayed (deleted then) or aged out with the events."""
    return stream_config(DLQ_STREAM, [f"{DLQ_PREFIX}.>"], cfg, cfg.events_max_age_days)
