"""The pure core of the chaos suite: when the killer strikes and what, and the verdict on a run.

No I/O here (tests/test_chaos_core.py tests it as plain functions); the shell that starts the stack, sends,
kills and reads the result back is tests/chaos_harness.py, used by tests/test_chaos.py (the short version in
the normal run) and bench/chaos.py (10+ seeds per mode, a table and one JSON line).

- :func:`kill_schedule`: from a seed, which process kind is SIGKILLed when (each kind of the mode at least once
  when there are enough kills), spread over the sending window so that every kill has its own recovery.
- :func:`verdict`: given what was sent (SOP UID -> study, digest of the data set bytes), what the receiver
  acknowledged (0x0000), what the catalogue holds, the bytes exported back, what the router forwarded and the
  study-complete events: lost, corrupt, conflicting (one SOP stored with two contents), phantoms (stored, never
  sent), studies not completed exactly once (or completed with another instance count than stored).
- :func:`recovery_times`: per kill, the time until the last instance it delayed was catalogued.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# What the killer can aim at, by the role of the process in the running stack.
RECEIVER = "receiver"      # an ingest receiver process (a child of `dicomflow ingest`)
STORE = "store"            # a store worker (consumer-group member)
ROUTER = "router"          # the router (consumer-group member; forwards with storescu)
NATS = "nats"              # the embedded nats-server of `dicomflow run`
NATS_MEMBER = "nats-member"  # any node of a 3-node NATS cluster
NATS_LEADER = "nats-leader"  # the node leading the instance stream at that moment
CATALOGUE = "catalogue"    # the catalogue's PostgreSQL server (its postmaster)
KINDS = (RECEIVER, STORE, ROUTER, NATS)  # what `dicomflow run` on its embedded nats-server has
CLUSTER_KINDS = (RECEIVER, STORE, ROUTER, NATS_MEMBER, NATS_LEADER, CATALOGUE)  # the services one by one
ALL_KINDS = (*KINDS, NATS_MEMBER, NATS_LEADER, CATALOGUE)


@dataclass(frozen=True)
class Kill:
    """One planned SIGKILL: ``at_s`` seconds after sending started, of a process of ``kind``; ``pick`` chooses
    among the processes of that kind alive at that moment (index = pick mod their number, in pid order)."""

    at_s: float
    kind: str
    pick: int


def kill_schedule(seed: int, kinds: Sequence[str], window_s: float, kills: int) -> list[Kill]:
    """The kills of one run, a pure function of its arguments.

    The window is cut into ``kills`` equal slots and each kill falls at a random moment of the middle 70 % of
    its slot, so two kills are at least 30 % of a slot apart (each has its own recovery to measure) and the
    first is not before the sender got going. Kinds are dealt round-robin from a seeded shuffle, so a run with
    at least as many kills as kinds hits every kind.
    """
    if kills < 0 or window_s <= 0:
        raise ValueError("kills must be >= 0 and window_s > 0")
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown kinds {unknown}; choose from {ALL_KINDS}" if unknown else "no kinds to kill")
    rng = random.Random(seed)
    deck: list[str] = []
    slot = window_s / kills if kills else 0.0
    out = []
    for i in range(kills):
        if not deck:
            deck = list(kinds)
            rng.shuffle(deck)
        kind = deck.pop()
        at = slot * i + slot * rng.uniform(0.15, 0.85)
        out.append(Kill(round(at, 3), kind, rng.randrange(1 << 16)))
    return out


@dataclass(frozen=True)
class SentInstance:
    """An instance the sender has: its study and the digest of its data set bytes as sent."""

    sop: str
    study: str
    digest: str


@dataclass(frozen=True)
class StoredInstance:
    """A catalogue row: the SOP, its study and the digest the store recorded."""

    sop: str
    study: str
    digest: str


@dataclass(frozen=True)
class Completion:
    """One event on ``dicom.study.complete.<study>`` (``updated``: False) or ``dicom.study.updated.<study>``."""

    study: str
    instances: int
    updated: bool = False


@dataclass
class Verdict:
    """What went wrong in one run (every list empty: nothing did), with the counts beside it."""

    sent: int
    acknowledged: int
    stored: int
    lost: list[str] = field(default_factory=list)            # acknowledged, not stored (or not exported)
    corrupt: list[str] = field(default_factory=list)         # stored or exported with other bytes than sent
    conflicting: list[str] = field(default_factory=list)     # one SOP stored with two different digests
    phantoms: list[str] = field(default_factory=list)        # stored, never sent
    not_forwarded: list[str] = field(default_factory=list)   # acknowledged, never reached the router's target
    completion_errors: dict[str, str] = field(default_factory=dict)  # study -> why
    stored_unacknowledged: int = 0  # stored though its answer was lost (allowed: the sender retried or gave up)
    reopened: int = 0               # dicom.study.updated events (a study completed, then got more)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.corrupt or self.conflicting or self.phantoms or self.not_forwarded
                    or self.completion_errors)

    def problems(self) -> str:
        """One line per kind of failure, with a few examples; empty when ok."""
        lines = []
        for name in ("lost", "corrupt", "conflicting", "phantoms", "not_forwarded"):
            items = getattr(self, name)
            if items:
                lines.append(f"{name}: {len(items)} e.g. {sorted(items)[:3]}")
        for study, why in sorted(self.completion_errors.items())[:5]:
            lines.append(f"study {study}: {why}")
        return "\n".join(lines)


def verdict(sent: Mapping[str, SentInstance], acknowledged: Iterable[str], stored: Iterable[StoredInstance],
            exported: Mapping[str, str] | None, completions: Iterable[Completion],
            forwarded: Iterable[str] | None = None) -> Verdict:
    """Judge one run.

    ``exported``: SOP UID -> digest of the data set bytes read back (``dicomflow export``); None skips the
    byte check. ``forwarded``: the SOP UIDs the router's target received; None when nothing was forwarded.
    Every study with an acknowledged instance must complete exactly once (one ``dicom.study.complete``), and
    the last completion of a study must count every instance of it the catalogue holds.
    """
    acked = set(acknowledged)
    rows = list(stored)
    digests: dict[str, set[str]] = defaultdict(set)
    study_of_row: dict[str, str] = {}
    for r in rows:
        digests[r.sop].add(r.digest)
        study_of_row[r.sop] = r.study
    v = Verdict(sent=len(sent), acknowledged=len(acked & set(sent)), stored=len(digests))
    v.phantoms = sorted(s for s in digests if s not in sent)
    v.conflicting = sorted(s for s, d in digests.items() if len(d) > 1)
    v.corrupt = sorted({s for s, d in digests.items() if s in sent and any(x != sent[s].digest for x in d)}
                       | {s for s, d in (exported or {}).items() if s in sent and d != sent[s].digest})
    v.lost = sorted(s for s in acked if s not in digests or (exported is not None and s not in exported))
    v.stored_unacknowledged = sum(1 for s in digests if s in sent and s not in acked)
    if forwarded is not None:
        got = set(forwarded)
        v.not_forwarded = sorted(acked - got)
    events = list(completions)
    v.reopened = sum(1 for e in events if e.updated)
    firsts = Counter(e.study for e in events if not e.updated)
    last: dict[str, Completion] = {}
    for e in events:
        last[e.study] = e
    catalogued = Counter(study_of_row.values())
    for study in sorted({sent[s].study for s in acked if s in sent}):
        if firsts[study] != 1:
            v.completion_errors[study] = f"completed {firsts[study]} times"
        elif last[study].instances != catalogued[study]:
            v.completion_errors[study] = (f"last completion counted {last[study].instances} instances, "
                                          f"the catalogue holds {catalogued[study]}")
    return v


def recovery_times(kill_times: Sequence[float], acked_at: Mapping[str, float], stored_at: Mapping[str, float],
                   normal_s: float = 2.0) -> list[float | None]:
    """Per kill, seconds from the kill until the last instance it delayed was catalogued; 0 when it delayed none.

    An instance is delayed when it was catalogued more than ``normal_s`` after its acknowledgement; a kill
    delayed those catalogued after it and acknowledged between the previous kill and the next one (the events a
    killed store held, and those that waited for its partitions' new owner, the pin to lapse or NATS to return).
    None for a kill after which an instance acknowledged before the next kill was never catalogued. Times are
    on one clock (the harness's wall clock); ``kill_times`` in order.
    """
    out: list[float | None] = []
    for i, k in enumerate(kill_times):
        since = kill_times[i - 1] if i else float("-inf")
        until = kill_times[i + 1] if i + 1 < len(kill_times) else float("inf")
        latest: float | None = k
        for sop, t in acked_at.items():
            if not since <= t < until:
                continue
            s = stored_at.get(sop)
            if s is None:
                latest = None
                break
            if s > k and s - t > normal_s:
                latest = max(latest, s)
        out.append(None if latest is None else latest - k)
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarise(mode: str, verdicts: Sequence[Verdict], recoveries: Sequence[float | None]) -> dict:
    """One row of the figures: a mode's runs together (counts summed, recovery over every kill)."""
    known = [r for r in recoveries if r is not None]
    return {
        "mode": mode,
        "runs": len(verdicts),
        "kills": len(recoveries),
        "sent": sum(v.sent for v in verdicts),
        "acknowledged": sum(v.acknowledged for v in verdicts),
        "lost": sum(len(v.lost) for v in verdicts),
        "corrupt": sum(len(v.corrupt) for v in verdicts),
        "conflicting": sum(len(v.conflicting) for v in verdicts),
        "phantoms": sum(len(v.phantoms) for v in verdicts),
        "not_forwarded": sum(len(v.not_forwarded) for v in verdicts),
        "completion_errors": sum(len(v.completion_errors) for v in verdicts),
        "reopened": sum(v.reopened for v in verdicts),
        "unrecovered_kills": len(recoveries) - len(known),
        "recovery_p50_s": _round(percentile(known, 50)),
        "recovery_p95_s": _round(percentile(known, 95)),
        "recovery_max_s": _round(max(known) if known else None),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)
