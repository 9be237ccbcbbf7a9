"""Study assembly and completion: the state of one study and the decisions over it. Pure.

The state lives in a JetStream KV bucket (the service's shell), so any router member can take a
study over. It stays small whatever the study's size (it is rewritten on every arrival): the live
counts skip redeliveries of the last RECENT instances (a short hash of SOP UID + digest each), and
the exact figures of a completion event are recounted from the instance stream (:func:`summarize`).
A generation counts completions: an instance stored after a completion re-opens the study
(generation + 1) and its next completion is a ``study.updated``; a redelivery of an instance the
completion already covered (stream sequence at or below it) does not.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import blake3
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
    recent: list[str] = Field(default_factory=list, description="short hashes of the last RECENT instances (redelivery filter)")
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
    tenant: str = ""


@dataclass(frozen=True)
class Decision:
    """A study to complete now."""

    reason: str  # "quiet" or "forced"
    incomplete: bool = False
    discard: bool = False


RECENT = 512  # redeliveries come from a partition's in-flight batch; 512 keys are ~8 KiB of state


def instance_key(sop_uid: str, digest: str) -> str:
    """The short, fixed-size memory of one instance."""
    return blake3.blake3(f"{sop_uid}:{digest}".encode()).hexdigest()[:12]


def record_arrival(state: StudyState | None, a: Arrival, now: float, policy: CompletionConfig,
                   on_complete: bool) -> tuple[StudyState, bool]:
    """The state after an arrival, and whether anything changed (False for a redelivered instance)."""
    st = state.model_copy(deep=True) if state is not None else StudyState(study_uid=a.study_uid, first_arrival=now,
                                                                           gen_started=now, policy=policy)
    key = instance_key(a.sop_uid, a.digest)
    if key in st.recent:
        return st, False
    if not st.is_open:
        if a.seq and a.seq <= st.seq_at_complete:
            return st, False  # a redelivery of an instance the completion already covered
        st.gen += 1  # re-opened: the next completion is an update
        st.gen_started = now
    st.recent.append(key)
    del st.recent[:-RECENT]
    st.count += 1
    st.max_seq = max(st.max_seq, a.seq)
    series = st.series.setdefault(a.series_uid, SeriesState())
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
    """Count (seq, series UID, SOP UID, digest, series description, modality) items, each instance once."""
    seen: set[tuple[str, str]] = set()
    series: dict[str, SeriesState] = {}
    last = 0
    for seq, series_uid, sop, digest, desc, modality in items:
        last = max(last, seq)
        if (sop, digest) in seen:
            continue
        seen.add((sop, digest))
        s = series.setdefault(series_uid, SeriesState())
        s.n += 1
        s.description = s.description or desc
        s.modality = s.modality or modality
    return Summary(len(seen), series, last)
