"""When a partition's new owner may take the pin of a member that died holding it (pure).

A member killed with SIGKILL never unpins: its partitions' pins stay with a dead client until PinnedTTL
(``group.pinned_timeout_s``) lapses, and the instances arriving meanwhile wait for it although the membership
already forgot the member after ``member_ttl_s``. Every live member reports the pins it holds in its heartbeat
(:mod:`shared.bus.membership`), so a pin that no live member reports belongs to one that is gone - or to one
pinned a moment ago that has not heartbeated since. Hence two looks: the same pin, unreported by every live member,
seen again at least ``grace_s`` (two heartbeats) later, is orphaned, and the owner unpins it and pulls.

A member only cut off from NATS (its key expired while it lives) owns nothing after ``member_ttl_s`` and
stops pulling; if it is still finishing a batch, its handlers are idempotent and a study's writers serialise,
as they do when PinnedTTL lapses under it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Suspect:
    """A pin no live member reported, first seen at ``since`` (monotonic seconds)."""

    pin: str
    since: float


def judge_pin(pinned: str | None, live_pins: set[str] | None, suspect: Suspect | None, now: float,
              grace_s: float) -> tuple[bool, Suspect | None]:
    """Whether to take the partition's pin now, and the suspect to remember until the next look.

    ``pinned``: the pin the server holds for the partition (None: nobody holds one, our pull will get it);
    ``live_pins``: every pin the live members report, None when the ownership cannot tell (a lone worker or
    a static group: nobody to take over from).
    """
    if not pinned or live_pins is None or pinned in live_pins:
        return False, None
    if suspect is None or suspect.pin != pinned:
        return False, Suspect(pinned, now)
    return now - suspect.since >= grace_s, suspect
