"""How a batch of instances gets to its placements, backend by backend. Pure: plain data in, a plan out.

For each backend, in the order the batch first names them: the instances only *checked* there
(the backend is their staging backend: the ingest made the claim-check durable in it, so there is
nothing to copy), and those *copied* there, each read from its staging backend. An instance's
bytes are read once, at its first copy, and dropped after its last one (``keep`` False): holding a
batch's worth of 512 KiB objects at once made every batch page-fault fresh memory. An instance too
large to hold (``store.stream_above_bytes``) is *streamed* instead, chunk by chunk, at each copy.

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
    stream: bool = False  # too large to hold: copied chunk by chunk into the backend's writer (never kept)


@dataclass(frozen=True)
class BackendPlan:
    """What one backend does for the batch, in the batch's order."""

    backend: str
    steps: tuple[Check | Copy, ...]


def plan_placements(items: Sequence[tuple[str, Sequence[str]]], sizes: Sequence[int] = (),
                    stream_above: int | None = None) -> list[BackendPlan]:
    """The plan for instances given as (staging backend, placements); a placement named twice counts once.

    An instance whose size (``sizes``, in the same order) is above ``stream_above`` is streamed to each
    placement that copies it, read from staging every time: holding it whole is what streaming avoids.
    """
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
            if stream_above is not None and i < len(sizes) and sizes[i] > stream_above:
                steps[name].append(Copy(i, staging, keep=False, stream=True))
            else:
                steps[name].append(Copy(i, staging, keep=copies_left[i] > 0))
    return [BackendPlan(name, tuple(steps[name])) for name in backends]
