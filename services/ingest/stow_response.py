"""The STOW-RS answer (PS3.18 10.5.3): which HTTP status, and the response data set, from each part's outcome. Pure.

- Every instance stored: 200. Some stored, some not: 202. None stored: 409, except when every
  failure is transient (0xA700: staging or NATS unavailable), which is 503 with Retry-After, since
  sending the same request again later will work.
- The body lists each instance: ReferencedSOPSequence (0008,1199) for those stored, with their
  RetrieveURL; FailedSOPSequence (0008,1198) with FailureReason (0008,1197), the same status the SCP
  would answer a C-STORE of it with. RetrieveURL (0008,1190) of the study when all stored instances
  are of one study.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.contract.uids import uid_url
from shared.dicom.statuses import OUT_OF_RESOURCES, SUCCESS


@dataclass(frozen=True)
class PartOutcome:
    """What became of one part of the request."""

    status: int
    sop_class_uid: str
    sop_uid: str
    study_uid: str = ""
    series_uid: str = ""
    reason: str = ""


def _uid(tag: str, value: str) -> dict:
    return {tag: {"vr": "UI", "Value": [value]}} if value else {}


def stow_answer(outcomes: list[PartOutcome], base_url: str) -> tuple[int, dict]:
    """(HTTP status, response as DICOM JSON) of a STOW-RS request whose parts ended as ``outcomes``."""
    stored = [o for o in outcomes if o.status == SUCCESS]
    failed = [o for o in outcomes if o.status != SUCCESS]
    body: dict = {}
    studies = {o.study_uid for o in stored}
    if len(studies) == 1 and stored[0].study_uid:
        body["00081190"] = {"vr": "UR", "Value": [f"{base_url}/studies/{uid_url(stored[0].study_uid)}"]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [
            {**_uid("00081150", o.sop_class_uid), **_uid("00081155", o.sop_uid),
             "00081197": {"vr": "US", "Value": [o.status]}} for o in failed]}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [
            {**_uid("00081150", o.sop_class_uid), **_uid("00081155", o.sop_uid),
             "00081190": {"vr": "UR", "Value": [
                 f"{base_url}/studies/{uid_url(o.study_uid)}/series/{uid_url(o.series_uid)}/instances/{uid_url(o.sop_uid)}"]}}
            for o in stored]}
    if not failed:
        return 200, body
    if stored:
        return 202, body
    if all(o.status == OUT_OF_RESOURCES for o in failed):
        return 503, body
    return 409, body
