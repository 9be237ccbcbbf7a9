"""Study assembly and completion: the state of one study and the decisions over it. Pure.

The state lives in a JetStream KV bucket (the service's shell), so any router member can take a
study over. It stays small whatever the study's size (it is rewritten on every arrival): the live
counts skip redeliveries of the last ``router.recent_instances`` (a short hash of SOP UID and of digest each), and
the exact figures of a completion event are recounted from the instance stream (:func:`summarize`).
Each receipt of an instance is an event of its own, so the same bytes received again (a resend) are
told from a new version here: by the recent hashes, and beyond them by the instance's earlier events
in the stream (:func:`verdict_from_history`); the last version received wins.
A generation counts completions: an instance stored after a completion re-opens the study
(generation + 1) and its next completion is a ``study.updated``; a redelivery of an instance the
completion already covered (stream sequence at or below it) does not.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from blake3 import blake3
from pydantic import BaseModel, Field

from shared.config import CompletionConfig


class SeriesState(BaseModel):
    n: int = 0
    description: str = ""
    modality: str = ""


class StudyState(BaseModel):
    """Everything the router remembers about one study."""

    study_uid: str
    gen: int = 1
    completed_gen: int = 0
    count: int = 0
    count_at_complete: int = 0
    seq_at_complete: int = 0
    max_seq: int = 0
    recent: list[str] = Field(default_factory=list, description="short hashes of the last router.recent_instances instances (redelivery filter)")
    series: dict[str, SeriesState] = Field(default_factory=dict)
    first_arrival: float = 0.0
    gen_started: float = 0.0
    last_arrival: float = 0.0
    patient_id: str = ""
    accession_number: str = ""
    calling_ae: str = ""
    institution_name: str = ""
    tenant: str = ""
    policy: CompletionConfig | None = None
    on_complete: bool = Field(False, description="some instance matched a forward rule with when: complete")
    targets: list[str] = Field(default_factory=list, description="destinations already announced (study.routed)")

    @property
    def is_open(self) -> bool:
        return self.completed_gen < self.gen


@dataclass(frozen=True)
class Arrival:
    """One instance as the completion logic sees it."""

    study_uid: str
    series_uid: str
    sop_uid: str
    digest: str
    seq: int
    series_description: str = ""
    modality: str = ""
    patient_id: str = ""
    accession_number: str = ""
    calling_ae: str = ""
    institution_name: str = ""
    tenant: str = ""  # two tenants' instances with one UID are two instances, never versions of one
    replaces: bool = False  # another version of this SOP instance arrived before (found in the stream)


@dataclass(frozen=True)
class Decision:
    """A study to complete now."""

    reason: str  # "quiet" or "forced"
    incomplete: bool = False
    discard: bool = False


RECENT = 512  # the default of router.recent_instances: 512 keys are ~10 KiB of state


_SOP_KEY = 8  # hex characters of an instance key that name the SOP instance; the other 8 name its bytes
_KEY_LENGTH = 16


def instance_key(sop_uid: str, digest: str, tenant: str = "") -> str:
    """The short, fixed-size memory of one version of an instance: 8 hex characters of the hash of its tenant
    and SOP Instance UID, then 8 of its bytes' (so another version of the same instance is recognised as
    one, and two versions are taken for one another once in 4 billion)."""
    return blake3(f"{tenant}\0{sop_uid}".encode()).hexdigest()[:_SOP_KEY] + digest[:_KEY_LENGTH - _SOP_KEY]


Verdict = str  # "duplicate" (the version held, again), "new", "replaces" (another version), "unknown"


def recent_verdict(state: StudyState | None, sop_uid: str, digest: str, recent: int = RECENT,
                   tenant: str = "") -> Verdict:
    """What the study's recent memory (of ``recent`` instances) says of an arrival: "unknown" where it cannot
    tell a new instance from one received before it remembers (a study of ``recent`` instances or more, a
    completed one, or none in KV: expired, or never seen), and the shell must look at the instance's
    earlier events."""
    if state is not None:
        key = instance_key(sop_uid, digest, tenant)
        if key in state.recent:
            return "duplicate"
        if any(k.startswith(key[:_SOP_KEY]) for k in state.recent):
            return "replaces"
    if state is None or not state.is_open or state.count >= recent:
        return "unknown"
    if any(len(k) != _KEY_LENGTH for k in state.recent):
        return "unknown"  # a state written before versions (12-character keys of SOP + digest): it cannot tell
    return "new"


def verdict_from_history(earlier_digests: list[str], digest: str) -> Verdict:
    """What an arrival is given the digests of the instance's earlier events in the stream, oldest first:
    the same bytes as the last of them is a resend (a duplicate), other bytes a new version."""
    if not earlier_digests:
        return "new"
    return "duplicate" if earlier_digests[-1] == digest else "replaces"


def record_arrival(state: StudyState | None, a: Arrival, now: float, policy: CompletionConfig,
                   on_complete: bool, recent: int = RECENT) -> tuple[StudyState, bool]:
    """The state after an arrival, and whether anything changed (False for a redelivered instance); the
    state remembers the last ``recent`` instances.

    A new version of an instance (``a.replaces``, or another version in the recent memory) re-opens a
    completed study but counts no second instance.
    """
    st = state.model_copy(deep=True) if state is not None else StudyState(study_uid=a.study_uid, first_arrival=now,
                                                                           gen_started=now, policy=policy)
    key = instance_key(a.sop_uid, a.digest, a.tenant)
    if key in st.recent:
        return st, False
    if not st.is_open:
        if a.seq and a.seq <= st.seq_at_complete:
            return st, False  # a redelivery of an instance the completion already covered
        st.gen += 1  # re-opened: the next completion is an update
        st.gen_started = now
    older = [k for k in st.recent if k.startswith(key[:_SOP_KEY])]
    replaces = a.replaces or bool(older)
    st.recent = [k for k in st.recent if k not in older]
    st.recent.append(key)
    del st.recent[:-recent]
    st.max_seq = max(st.max_seq, a.seq)
    series = st.series.setdefault(a.series_uid, SeriesState())
    if not replaces:
        st.count += 1
        series.n += 1
    series.description = series.description or a.series_description
    series.modality = series.modality or a.modality
    st.last_arrival = max(st.last_arrival, now)
    for attr in ("patient_id", "accession_number", "calling_ae", "institution_name", "tenant"):
        if not getattr(st, attr) and getattr(a, attr):
            setattr(st, attr, getattr(a, attr))
    if st.policy is None:
        st.policy = policy
    st.on_complete = st.on_complete or on_complete
    return st, True


def conditions_met(st: StudyState, policy: CompletionConfig) -> bool:
    """Whether the required series (by description) and the minimum series count are there."""
    if len(st.series) < policy.min_series:
        return False
    have = {s.description.strip().lower() for s in st.series.values()}
    return all(req.strip().lower() in have for req in policy.required_series)


def due(st: StudyState, now: float, default: CompletionConfig) -> Decision | None:
    """Whether the study completes now, and how."""
    if not st.is_open or st.count == 0:
        return None
    policy = st.policy or default
    met = conditions_met(st, policy)
    if met and now - st.last_arrival >= policy.quiet_s:
        return Decision("quiet")
    if (policy.force_after_s > 0 and policy.force_action != "wait"
            and now - st.gen_started >= policy.force_after_s):
        return Decision("forced", incomplete=not met, discard=policy.force_action == "discard")
    return None


def mark_completed(st: StudyState, gen: int, seq: int, count: int) -> StudyState | None:
    """The state once generation ``gen`` (covering the stream up to ``seq``, ``count`` instances) was announced.

    None when another member already recorded it. Instances handled between the decision and now
    were not covered: the study re-opens at once so they get their own ``study.updated``.
    """
    if st.completed_gen >= gen:
        return None
    out = st.model_copy(deep=True)
    out.completed_gen = gen
    out.count_at_complete = count
    out.seq_at_complete = max(out.seq_at_complete, seq)
    if out.max_seq > seq:
        out.gen = gen + 1
        out.gen_started = out.last_arrival
    return out


@dataclass(frozen=True)
class Summary:
    """The exact content of a study, recounted from its instance events."""

    instances: int
    series: dict[str, SeriesState]
    last_seq: int


def summarize(items: Iterable[tuple[int, str, str, str, str, str]]) -> Summary:
    """Count (seq, series UID, SOP UID, digest, series description, modality) items, each instance once,
    in the series of its last version."""
    latest: dict[str, tuple[str, str, str]] = {}
    last = 0
    for seq, series_uid, sop, _digest, desc, modality in sorted(items):
        last = max(last, seq)
        latest[sop] = (series_uid, desc, modality)
    series: dict[str, SeriesState] = {}
    for series_uid, desc, modality in latest.values():
        s = series.setdefault(series_uid, SeriesState())
        s.n += 1
        s.description = s.description or desc
        s.modality = s.modality or modality
    return Summary(len(latest), series, last)


def latest_versions(events: Iterable[tuple[int, str, str, object]]) -> list[tuple[int, object]]:
    """The (seq, event) of the version each instance holds last, from (seq, SOP UID, digest, event) items, in
    stream order: what a study walk forwards (a resend or an earlier version is not sent again). A version
    whose event comes again (a resend of the same bytes) keeps its first event."""
    held: dict[str, tuple[int, str, object]] = {}
    for seq, sop, digest, event in sorted(events, key=lambda e: e[0]):
        if sop in held and held[sop][1] == digest:
            continue
        held[sop] = (seq, digest, event)
    return sorted(((seq, event) for seq, _, event in held.values()), key=lambda e: e[0])
