"""Every NATS subject and stream dicomflow uses, in one place.

UIDs travel as subject tokens with ``.`` replaced by ``_`` (:func:`shared.uids.uid_token`), after
validation, so no UID can inject a wildcard or an extra token.
"""

from __future__ import annotations

from .config import StreamConfig
from .uids import uid_token

IN_PREFIX = "dicom.in"
PART_PREFIX = "dicom.part"
STORED_PREFIX = "dicom.stored"
REJECTED_PREFIX = "dicom.rejected"

NS = 1_000_000_000


def instance_in(study_uid: str, sop_uid: str) -> str:
    """Subject the ingest publishes an :class:`~shared.events.InstanceReceived` to."""
    return f"{IN_PREFIX}.{uid_token(study_uid)}.{uid_token(sop_uid)}"


def partition_filter(partition: int) -> str:
    """Filter subject of one partition's consumers (the stream stores ``dicom.part.<P>.<study>.<sop>``)."""
    return f"{PART_PREFIX}.{partition}.>"


def partition_from_subject(subject: str) -> int:
    """The partition number of a stored (transformed) subject."""
    return int(subject.split(".")[2])


def instance_stored(study_uid: str, sop_uid: str) -> str:
    """Subject of :class:`~shared.events.InstanceStored`."""
    return f"{STORED_PREFIX}.{uid_token(study_uid)}.{uid_token(sop_uid)}"


def instance_rejected(study_uid: str, sop_uid: str) -> str:
    """Subject of :class:`~shared.events.InstanceRejected`."""
    return f"{REJECTED_PREFIX}.{uid_token(study_uid)}.{uid_token(sop_uid)}"


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
                         [f"{STORED_PREFIX}.>", f"{REJECTED_PREFIX}.>", "dicom.study.>", "dicom.forward.>"],
                         cfg, cfg.events_max_age_days)
