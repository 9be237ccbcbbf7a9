"""How a batch of instances gets to its placements, backend by backend. Pure: plain data in, a plan out.

For each backend, in the order the batch first names them: the instances only *checked* there
(the backend is their staging backend: the ingest made the claim-check durable in it, so there is
nothing to copy), and those *copied* there, each read from its staging backend. An instance's
bytes are read once, at its first copy, and dropped after its last one (``keep`` False): holding a
batch's worth of 512 KiB objects at once made every batch page-fault fresh memory.

The store's executor (``storing.Storer.place_many``) follows the plan, reading the claim-checks
lazily as a backend takes its writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    """Confirm that instance ``item`` is in this backend, its staging backend (no write)."""

    item: int


@dataclass(frozen=True)
class Copy:
    """Write instance ``item`` here, read from (or still held since reading from) staging backend ``source``."""

    item: int
    source: str
    keep: bool  # a later backend copies it too: hold the bytes instead of reading them again


@dataclass(frozen=True)
class BackendPlan:
    """What one backend does for the batch, in the batch's order."""

    backend: str
    steps: tuple[Check | Copy, ...]


def plan_placements(items: Sequence[tuple[str, Sequence[str]]]) -> list[BackendPlan]:
    """The plan for instances given as (staging backend, placements); a placement named twice counts once."""
    backends = list(dict.fromkeys(name for _, placements in items for name in placements))
    steps: dict[str, list[Check | Copy]] = {name: [] for name in backends}
    copies_left = [len(set(placements) - {staging}) for staging, placements in items]
    for name in backends:
        for i, (staging, placements) in enumerate(items):
            if name not in placements:
                continue
            if name == staging:
                steps[name].append(Check(i))
                continue
            copies_left[i] -= 1
            steps[name].append(Copy(i, staging, keep=copies_left[i] > 0))
    return [BackendPlan(name, tuple(steps[name])) for name in backends]
