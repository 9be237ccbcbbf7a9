"""May a staged object be released now? Pure: plain data in (what the streams still reference, the
object, the time), a verdict out. The shell (``service.py``) gathers the data and carries the verdicts out.

A staged object (the claim-check, named by its blake3 digest) is needed while any of these names its digest:

- an instance event on the instance stream that the store group or the router group has not acknowledged
  (every event above the lower of the two groups' ack floors on its partition counts, acknowledged or not:
  an ack floor is exact below it and says nothing above it);
- a forward job on ROUTER_OUT (a work queue: a job is there until it is sent, handed on or dead-lettered);
- a dead letter on DICOM_DLQ (kept until ``dicomflow dlq replay`` queues it again or ``dlq purge`` drops it).

Content addressing means two instances, or two sends of one, may share one object: the object goes only
when no reference to its digest remains. On top, two guards that need no stream: an object written or
touched (a resend claims the bytes again) after ``not_after`` is kept, because its event may not be in the
stream yet; and an object that no placement holds is kept, because then the staged copy is the only one
(an instance the store rejected, or one it has not placed yet) - unless a deletion (``dicom.deleted``)
named its digest: its placements' copies went because the instance was deleted, and nothing pending
(checked first) needs the staged one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shared.storage.objectstore import StoredObject

# Why an object is kept, in the order they are checked (also the label of the held-objects gauge).
DEAD_LETTER = "dead_letter"
FORWARD_JOB = "forward_job"
INSTANCE_EVENT = "instance_event"
YOUNG = "young"
NOT_PLACED = "not_placed"
REASONS = (DEAD_LETTER, FORWARD_JOB, INSTANCE_EVENT, YOUNG, NOT_PLACED)


@dataclass(frozen=True)
class Holds:
    """The digests the streams still reference, by who references them."""

    instance_events: frozenset[str] = frozenset()
    forward_jobs: frozenset[str] = frozenset()
    dead_letters: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Keep:
    reason: str


@dataclass(frozen=True)
class Release:
    pass


def held_by(obj: StoredObject, holds: Holds, not_after: float) -> str | None:
    """Why the streams or the clock keep ``obj`` (None: nothing but the placement check stands in the way)."""
    if obj.digest in holds.dead_letters:
        return DEAD_LETTER
    if obj.digest in holds.forward_jobs:
        return FORWARD_JOB
    if obj.digest in holds.instance_events:
        return INSTANCE_EVENT
    if obj.mtime > not_after:
        return YOUNG
    return None


def verdict(obj: StoredObject, holds: Holds, not_after: float, placed: bool, deleted: bool = False) -> Keep | Release:
    """Whether ``obj`` may be released now: nothing references it, it is older than the grace, and it is placed
    or was deleted (``deleted``: a deletion event names its digest, so no placement holding it is expected)."""
    reason = held_by(obj, holds, not_after)
    if reason:
        return Keep(reason)
    if not placed and not deleted:
        return Keep(NOT_PLACED)
    return Release()


def ack_floor(floors: Mapping[str, int | None]) -> int:
    """The partition's sequence up to which every required group has acknowledged everything.

    ``floors`` maps each required group to its consumer's ack floor on the partition, None where the
    consumer does not exist yet (a group not started): then nothing on the partition is done.
    """
    if not floors:
        return 0
    return min(f or 0 for f in floors.values())


def pending_digests(events: Iterable[tuple[int, int, str]], floors: Mapping[int, int]) -> frozenset[str]:
    """The digests of the instance events, given as (stream sequence, partition, digest), above their partition's floor."""
    return frozenset(d for seq, p, d in events if seq > floors.get(p, 0))


def required_groups(router_configured: bool, groups_present: Iterable[str]) -> tuple[str, ...]:
    """The consumer groups whose acknowledgements release an instance event: the store always, the router when
    one is configured or has ever consumed (its durables exist): a router started later reads from the start."""
    return ("store", "router") if router_configured or "router" in set(groups_present) else ("store",)


def staging_is_placement(staging: str, policies: Mapping[str, Iterable[str]]) -> str | None:
    """The first policy that places instances in the staging backend itself (its objects are then stored
    copies and nothing may be released), or None."""
    for name, placements in policies.items():
        if staging in placements:
            return name
    return None


def placement_backends(staging: str, policies: Mapping[str, Iterable[str]]) -> list[str]:
    """The backends any policy places instances in, staging aside, in the configuration's order."""
    return [b for b in dict.fromkeys(b for p in policies.values() for b in p) if b != staging]
