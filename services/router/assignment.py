"""Which member of a target group gets a study: weighted rendezvous hashing over StudyInstanceUID.

Pure. Every router member computes the same choice with no coordination; the first choice is then
recorded (sticky, see the service) so a study keeps its gateway when the group changes. A member
joining takes about weight/total of *new* studies; a member leaving moves only its own studies.
Optionally loads are bounded (Mirrokni, Thorup, Zadimoghaddam 2018): a member already holding more
than its share of open studies passes a new study on to the study's next choice.

Weights use the logarithmic method of weighted HRW: score = -w / ln(u), u uniform in (0, 1) from
blake3 of ``target/study`` - the share of studies a member wins is proportional to its weight.
shared.bus.rendezvous scores partitions (unweighted); this scores studies with weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import blake3

_TWO64 = float(2**64)


def score(study_uid: str, target: str, weight: float = 1.0) -> float:
    """The target's weighted score for a study (higher wins)."""
    h = int.from_bytes(blake3.blake3(f"{target}/{study_uid}".encode()).digest(8), "big")
    u = (h + 0.5) / _TWO64  # strictly inside (0, 1)
    return -weight / math.log(u)


def ranking(study_uid: str, members: Mapping[str, float]) -> list[str]:
    """The members in preference order for a study (ties break on the name)."""
    return sorted(members, key=lambda t: (-score(study_uid, t, members[t]), t))


def choose(study_uid: str, members: Mapping[str, float], healthy: Iterable[str] | None = None,
           exclude: Iterable[str] = (), loads: Mapping[str, int] | None = None, bound: float = 0.0) -> str | None:
    """The preferred member for a new study, or None when no member qualifies.

    Unhealthy members (not in ``healthy``; None means all are healthy) are skipped; when every
    member is down the study still gets its first choice (it waits there): a study needs a home to
    queue for. With ``loads`` (open studies per member) and ``bound`` > 0, consistent hashing with
    bounded loads: a member whose load would exceed ``ceil(bound * (total + 1) * weight / sum of
    weights)`` is passed over for the next one in the study's order, which keeps max/mean load near
    ``bound`` even for few gateways, while a study's choice still moves only when loads force it.
    """
    ex = set(exclude)
    order = [t for t in ranking(study_uid, members) if t not in ex]
    if not order:
        return None
    up = set(order if healthy is None else healthy)
    candidates = [t for t in order if t in up] or order[:1]
    if loads is None or bound <= 0 or len(candidates) == 1:
        return candidates[0]
    total = sum(loads.get(t, 0) for t in candidates) + 1
    weight = sum(members[t] for t in candidates)
    for t in candidates:
        if loads.get(t, 0) + 1 <= math.ceil(bound * total * members[t] / weight):
            return t
    return candidates[0]
