"""The router's decisions, pure: what an instance event asks for, where a group's study goes, what a failed send becomes.

The shells (``routing.Router``, ``forwarder.Forwarder``) read the inputs (the rules matched, the KV
assignment, the health of the members, the delivery count) and carry a decision out (publish the
jobs, claim or move in KV, resend the study, nak or dead-letter); every choice is made here, over
plain data, so each branch is unit-tested without NATS.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from shared.backoff import backoff_delay
from shared.config import CompletionConfig, ForwardConfig
from shared.contract.events import InstanceReceived

from .assignment import choose
from .completion import RECENT, Arrival, StudyState, record_arrival
from .rules import Rule, completion_for

# --- route planning: the rules matched by one instance -> what to do ---------------------------------------------


@dataclass(frozen=True)
class Forward:
    """One streaming forward to enqueue: a destination (a target or a group) named by a rule."""

    dest: str
    rule: str


@dataclass(frozen=True)
class InstancePlan:
    """Everything the matched rules ask of one instance event, in rule order."""

    forwards: tuple[Forward, ...]  # streaming forwards (``when: instance``), to enqueue now
    quarantines: tuple[str, ...]  # the rules that hold the instance for an operator
    policy: CompletionConfig  # the study's completion policy
    on_complete: bool  # some rule forwards the study when it completes
    arrival: Arrival  # the instance as the completion logic sees it


def forwarding(matched: Iterable[Rule], when: str) -> list[Rule]:
    """The matched rules that forward, at ``when`` ("instance": as it arrives; "complete": with the study)."""
    return [r for r in matched if r.action == "forward" and r.when == when]


def arrival_of(event: InstanceReceived, seq: int, replaces: bool = False) -> Arrival:
    """The instance event at stream sequence ``seq`` as the completion logic sees it (``replaces``: it
    brings another version of an instance received before)."""
    t = event.tags
    return Arrival(t.study_uid, t.series_uid, t.sop_uid, event.digest, seq, t.series_description, t.modality,
                   t.patient_id, t.accession_number, event.calling_ae, t.institution_name, event.tenant, replaces)


def plan_instance(matched: Sequence[Rule], event: InstanceReceived, seq: int,
                  default_completion: CompletionConfig, replaces: bool = False) -> InstancePlan:
    """What the rules ``matched`` by an instance event ask for (``drop`` asks for nothing)."""
    forwards = tuple(Forward(dest, r.name) for r in forwarding(matched, "instance") for dest in r.to)
    quarantines = tuple(r.name for r in matched if r.action == "quarantine")
    return InstancePlan(forwards, quarantines, completion_for(matched, default_completion),
                        bool(forwarding(matched, "complete")), arrival_of(event, seq, replaces))


class Routed(NamedTuple):
    """A destination an instance was queued to: the target, its group ("" for a plain target), the rule."""

    target: str
    group: str
    rule: str


def newly_routed(before: StudyState | None, routed: Iterable[Routed]) -> list[Routed]:
    """The destinations not yet announced for the study (each once, the first rule naming it)."""
    known = set(before.targets) if before is not None else set()
    out = []
    for r in routed:
        if r.target not in known:
            known.add(r.target)
            out.append(r)
    return out


def record_instance(state: StudyState | None, plan: InstancePlan, now: float, routed: Sequence[Routed],
                    recent: int = RECENT) -> tuple[StudyState | None, list[Routed]]:
    """The study state after the instance (None: nothing to write) and the destinations to announce
    (``recent``: how many instances the state remembers).

    Without side effects, so a compare-and-set loop can run it again on the state it re-read.
    """
    after, changed = record_arrival(state, plan.arrival, now, plan.policy, plan.on_complete, recent)
    fresh = newly_routed(state, routed)
    after.targets.extend(r.target for r in fresh)
    return (after if changed or fresh else None), fresh


# --- sticky assignment: which member of a group holds a study ---------------------------------------------------


@dataclass(frozen=True)
class Keep:
    """The recorded member stays."""

    target: str


@dataclass(frozen=True)
class Claim:
    """No member recorded yet: record this first choice (the first claim wins cluster-wide)."""

    target: str


@dataclass(frozen=True)
class Move:
    """Move the whole study from the recorded member to another (never half of it)."""

    source: str
    target: str


Assignment = Keep | Claim | Move | None  # None: nowhere to go (no healthy member to move to)


def resolve_assignment(study_uid: str, current: str | None, members: Mapping[str, float], healthy: Iterable[str],
                       loads: Mapping[str, int] | None = None, bound: float = 0.0, exclude: Iterable[str] = ()
                       ) -> Assignment:
    """Keep, claim or move the study's member of a group (weights ``members``), or None.

    The recorded member ``current`` is kept while it is in the group and not excluded. A study with
    no member is claimed for its first choice (:func:`assignment.choose`: healthy members first,
    loads bounded); one whose member left the group (a reload) moves whole to that choice, even when
    nothing is healthy: a study needs a home to queue for. One moved off a member that is still in the
    group (``exclude``: it is down) moves only to a healthy member, or not at all: moving it to another
    dead gateway would only resend it twice.
    """
    ex = set(exclude)
    if current is not None and current in members and current not in ex:
        return Keep(current)
    up = [t for t in healthy if t in members and t not in ex]
    if current is not None and current in members and not up:
        return None
    choice = choose(study_uid, members, up, exclude=ex, loads=loads, bound=bound)
    if choice is None:
        return None
    return Claim(choice) if current is None else Move(current, choice)


# --- a failed send: retry, reassign, or dead-letter -------------------------------------------------------------


@dataclass(frozen=True)
class Retry:
    """Negatively acknowledge: redelivered after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class DeadLetter:
    """Give up: the instance goes to the dead-letter stream."""

    reason: str


@dataclass(frozen=True)
class Reassign:
    """Move the study whole to another member of its group; ``otherwise`` when no member can take it."""

    otherwise: Retry | DeadLetter


Settlement = Retry | DeadLetter | Reassign


def settle_failure(attempts: int, on_member_down: str | None, fwd: ForwardConfig, reason: str) -> Settlement:
    """What a job that failed its ``attempts``-th delivery becomes.

    ``on_member_down`` is its group's policy (None for a plain target). Reassignment comes on a
    second failure, not the first: one refused connection is not a dead gateway.
    """
    if attempts >= fwd.max_attempts:
        fallback: Retry | DeadLetter = DeadLetter(reason)
    else:
        fallback = Retry(backoff_delay(attempts, fwd.backoff_initial_s, fwd.backoff_max_s))
    if on_member_down == "reassign" and attempts >= 2:
        return Reassign(fallback)
    return fallback


# --- a fetched batch: the sends it takes --------------------------------------------------------------------------


def sends(sizes: Sequence[int], limit: int) -> list[range]:
    """The fetched jobs (by index, in order) split into consecutive sends of at most ``limit`` bytes each (an
    instance over ``limit`` goes alone): what a send copies to the spool first is bounded, so the spool's disk is
    too, whatever the batch's instances weigh. Small instances keep their one send per batch."""
    out: list[range] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            out.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


# --- a job whose bytes could not be read: retry or dead-letter ---------------------------------------------------

Unread = Literal["missing", "corrupt", "unreadable"]


def unread_problem(problems: Iterable[Unread]) -> Unread:
    """What reading a job's bytes came to, from what each copy tried (staging, then the placements) gave.

    A copy that could not be read at all (an I/O error, a Ceph timeout) may hold good bytes: "unreadable"
    wins. Otherwise a copy whose bytes do not match the digest makes it "corrupt"; no copy at all, "missing".
    """
    seen = set(problems)
    for problem in ("unreadable", "corrupt"):
        if problem in seen:
            return problem
    return "missing"


def settle_unread(problem: Unread, attempts: int, fwd: ForwardConfig, reason: str) -> Retry | DeadLetter:
    """What a job becomes when no copy of its bytes could be read whole and verified (never sent).

    Missing or corrupt in every copy: dead-lettered at once. A store writes an object whole and renames
    (fs) or replaces (RADOS) it at once, so no later read finds other bytes: retrying would only hold the
    study's forwards for ``max_attempts`` backoffs before the same end, while the dead letter keeps the
    staged bytes and shows the instance to an operator now (``dicomflow dlq replay`` once it is repaired).
    Unreadable (an I/O error on a copy that may be good): retried with the backoff of a failed send, then
    dead-lettered; the target is not to blame (not marked down, its study not moved).
    """
    if problem == "unreadable" and attempts < fwd.max_attempts:
        return Retry(backoff_delay(attempts, fwd.backoff_initial_s, fwd.backoff_max_s))
    return DeadLetter(reason)
