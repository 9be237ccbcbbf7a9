"""Storage Commitment Push Model (PS3.4 Annex J) decisions, pure: a request in, which instances are committed out.

A modality sends an N-ACTION (Action Type ID 1) naming SOP instances and a Transaction UID; the SCP
answers the N-ACTION at once, and later an N-EVENT-REPORT: Event Type ID 1 when every instance is
committed, 2 when failures exist, each failure with its Failure Reason (PS3.4 J.3.2.1.1). dicomflow
commits an instance only once the catalogue holds it in every placement its policy names (the store
writes the catalogue row after the last placement, so a row that lists them all is the proof; a policy
given a placement since then is not yet satisfied). The shells (both SCP engines) parse, ask the
catalogue and send; what to answer is decided here, over plain data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shared.contract.uids import InvalidUID, validate_uid

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"  # the SOP class (PS3.4 J.3.5)
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP instance (PS3.4 J.3.5)
REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID (PS3.4 Table J.3-1)
EVENT_SUCCESS, EVENT_FAILURES = 1, 2  # Event Type ID (PS3.4 Table J.3-2)

# Failure Reason (0008,1197) of a Failed SOP Sequence item (PS3.4 J.3.2.1.1, C.14.1.1 of PS3.3)
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119

# N-ACTION-RSP statuses (PS3.7 10.1.4.1.10, Annex C)
SUCCESS = 0x0000
NO_SUCH_SOP_CLASS = 0x0118
INVALID_OBJECT_INSTANCE = 0x0117
NO_SUCH_ACTION = 0x0123
INVALID_ARGUMENT_VALUE = 0x0115
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
RESOURCE_LIMITATION = 0x0213

# The most instances one request may name: each is looked up (in batches) until the wait ends. Modalities send a
# study's or a series' worth; a request far beyond that is refused rather than held.
MAX_REFERENCES = 10_000

# Tags (DICOM JSON keys) of the Action Information and Event Information (PS3.4 Tables J.3-1 and J.3-2)
TRANSACTION_UID = "00081195"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_CLASS_UID = "00081150"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
RETRIEVE_AE_TITLE = "00080054"


class CommitmentError(Exception):
    """An N-ACTION the SCP will not process: its N-ACTION-RSP ``status`` and an Error Comment."""

    def __init__(self, status: int, comment: str):
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class Reference:
    """One SOP instance a request names."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class CommitmentRequest:
    """An N-ACTION's Action Information: its Transaction UID and the instances it names, in its order."""

    transaction_uid: str
    references: tuple[Reference, ...]


@dataclass(frozen=True)
class Verdict:
    """Which referenced instances are committed and which are not (with the Failure Reason and why, in words);
    ``final``: the N-EVENT-REPORT is due now (everything committed, or the wait is over)."""

    committed: tuple[Reference, ...]
    failed: tuple[tuple[Reference, int, str], ...]
    final: bool

    @property
    def event_type(self) -> int:
        """Event Type ID of the N-EVENT-REPORT: 1 all committed, 2 failures exist."""
        return EVENT_FAILURES if self.failed else EVENT_SUCCESS


def check_action(requested_sop_class: str, requested_sop_instance: str, action_type_id: int) -> None:
    """The N-ACTION's command fields (PS3.7 10.1.4.1): raises :class:`CommitmentError` unless it asks the Storage
    Commitment Push Model's well-known instance for action 1 (PS3.4 J.3.2.1.2)."""
    if requested_sop_class != STORAGE_COMMITMENT_PUSH:
        raise CommitmentError(NO_SUCH_SOP_CLASS, f"N-ACTION on SOP class {requested_sop_class!r}: only Storage "
                                                 f"Commitment Push Model is served")
    if requested_sop_instance != STORAGE_COMMITMENT_INSTANCE:
        raise CommitmentError(INVALID_OBJECT_INSTANCE, f"requested SOP instance {requested_sop_instance!r} is not "
                                                       f"{STORAGE_COMMITMENT_INSTANCE}")
    if action_type_id != REQUEST_STORAGE_COMMITMENT:
        raise CommitmentError(NO_SUCH_ACTION, f"Action Type ID {action_type_id}: only 1 (request storage commitment)")


def _one_value(item: Mapping, tag: str, what: str) -> str:
    element = item.get(tag)
    if element is None:
        raise CommitmentError(MISSING_ATTRIBUTE, f"{what} ({tag[:4]},{tag[4:]}) is missing")
    values = element.get("Value") or []
    if not values or values[0] in (None, ""):
        raise CommitmentError(MISSING_ATTRIBUTE_VALUE, f"{what} ({tag[:4]},{tag[4:]}) is empty")
    try:
        return validate_uid(values[0], what)
    except InvalidUID as exc:
        raise CommitmentError(INVALID_ARGUMENT_VALUE, str(exc)) from exc


def parse_request(model: Mapping) -> CommitmentRequest:
    """The Action Information (a DICOM JSON model) of a storage commitment request (PS3.4 Table J.3-1): the
    Transaction UID and the Referenced SOP Sequence, each item with its SOP class and instance UIDs. Raises
    :class:`CommitmentError` with the N-ACTION status for a missing or empty attribute, an unusable UID, or
    more than :data:`MAX_REFERENCES` items."""
    transaction = _one_value(model, TRANSACTION_UID, "Transaction UID")
    if REFERENCED_SOP_SEQUENCE not in model:
        raise CommitmentError(MISSING_ATTRIBUTE, "Referenced SOP Sequence (0008,1199) is missing")
    items = model[REFERENCED_SOP_SEQUENCE].get("Value") or []
    if not items:
        raise CommitmentError(MISSING_ATTRIBUTE_VALUE, "Referenced SOP Sequence (0008,1199) has no item")
    if len(items) > MAX_REFERENCES:
        raise CommitmentError(RESOURCE_LIMITATION, f"{len(items)} instances in one request, over {MAX_REFERENCES}")
    refs = tuple(Reference(_one_value(item, REFERENCED_SOP_CLASS_UID, "Referenced SOP Class UID"),
                           _one_value(item, REFERENCED_SOP_INSTANCE_UID, "Referenced SOP Instance UID"))
                 for item in items)
    return CommitmentRequest(transaction, refs)


def judge(request: CommitmentRequest, rows: Mapping[str, Mapping] | None, policies: Mapping[str, Sequence[str]],
          expired: bool) -> Verdict:
    """Which of the request's instances are committed, given the catalogue ``rows`` of the caller's tenant (SOP
    Instance UID -> a row with ``sop_class_uid``, ``policy`` and ``placements``; another tenant's instances are
    simply not there) and the configured ``policies`` (name -> placements).

    Committed: the row exists, its SOP class is the one referenced, and it lists every placement of its policy.
    Otherwise it fails with No such object instance (not in the catalogue: never received, not yet stored, or
    another tenant's), Class/Instance conflict (stored as another SOP class), or Processing failure (not in every
    placement its policy names now). ``rows`` None: the catalogue could not be asked, so nothing is known to be
    committed (Processing failure). ``expired``: the wait is over, so the verdict is final whatever failed.
    """
    committed: list[Reference] = []
    failed: list[tuple[Reference, int, str]] = []
    for ref in request.references:
        row = rows.get(ref.sop_instance_uid) if rows is not None else None
        if rows is None:
            failed.append((ref, PROCESSING_FAILURE, "the catalogue is unavailable"))
        elif row is None:
            failed.append((ref, NO_SUCH_OBJECT_INSTANCE, "not stored"))
        elif row["sop_class_uid"] != ref.sop_class_uid:
            failed.append((ref, CLASS_INSTANCE_CONFLICT, f"stored as SOP class {row['sop_class_uid']}"))
        elif (wanted := policies.get(row["policy"])) is None:
            failed.append((ref, PROCESSING_FAILURE, f"its placement policy {row['policy']!r} is no longer configured"))
        elif missing := [p for p in wanted if p not in row["placements"]]:
            failed.append((ref, PROCESSING_FAILURE, f"not yet in placement {', '.join(missing)}"))
        else:
            committed.append(ref)
    return Verdict(tuple(committed), tuple(failed), final=expired or not failed)


def _item(ref: Reference, retrieve_ae: str = "") -> dict:
    item = {REFERENCED_SOP_CLASS_UID: {"vr": "UI", "Value": [ref.sop_class_uid]},
            REFERENCED_SOP_INSTANCE_UID: {"vr": "UI", "Value": [ref.sop_instance_uid]}}
    if retrieve_ae:
        item[RETRIEVE_AE_TITLE] = {"vr": "AE", "Value": [retrieve_ae]}
    return item


def event_information(transaction_uid: str, verdict: Verdict, retrieve_ae: str) -> dict:
    """The N-EVENT-REPORT's Event Information (a DICOM JSON model, PS3.4 Table J.3-2): the Transaction UID, the
    committed instances in the Referenced SOP Sequence (each with the AE title that retrieves it), the failed
    ones in the Failed SOP Sequence with their Failure Reason. Every referenced instance is in one of them."""
    model: dict = {TRANSACTION_UID: {"vr": "UI", "Value": [transaction_uid]}}
    if verdict.committed:
        model[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [_item(r, retrieve_ae) for r in verdict.committed]}
    if verdict.failed:
        model[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [
            {**_item(ref), FAILURE_REASON: {"vr": "US", "Value": [reason]}} for ref, reason, _ in verdict.failed]}
    return model


def why_failed(verdict: Verdict, limit: int = 3) -> str:
    """The first few failures in words (for the log and the audit record)."""
    parts = [f"{ref.sop_instance_uid}: 0x{reason:04X} {text}" for ref, reason, text in verdict.failed[:limit]]
    more = len(verdict.failed) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
