"""The new owner's decision to take a pin that a killed member left behind (pure)."""

from __future__ import annotations

from shared.bus.pin_takeover import Suspect, judge_pin


def test_a_pin_a_live_member_reports_is_never_taken():
    assert judge_pin("P1", {"P1", "P2"}, Suspect("P1", 0.0), 100.0, 2.0) == (False, None)


def test_nobody_holds_it_or_nobody_can_tell():
    assert judge_pin(None, set(), None, 5.0, 2.0) == (False, None)
    assert judge_pin("", set(), None, 5.0, 2.0) == (False, None)
    # A lone worker or a static group has no membership reports: a pin is only released by PinnedTTL.
    assert judge_pin("P1", None, Suspect("P1", 0.0), 100.0, 2.0) == (False, None)


def test_an_unreported_pin_is_taken_only_when_seen_again_after_the_grace():
    take, suspect = judge_pin("P1", {"P9"}, None, 10.0, 2.0)
    assert not take and suspect == Suspect("P1", 10.0)          # maybe pinned a moment ago: wait two heartbeats
    take, suspect = judge_pin("P1", {"P9"}, suspect, 11.0, 2.0)
    assert not take and suspect == Suspect("P1", 10.0)
    take, suspect = judge_pin("P1", {"P9"}, suspect, 12.0, 2.0)
    assert take


def test_a_new_pin_or_a_reported_one_restarts_the_wait():
    suspect = Suspect("P1", 10.0)
    assert judge_pin("P2", set(), suspect, 20.0, 2.0) == (False, Suspect("P2", 20.0))
    # The holder heartbeated its pin meanwhile: not orphaned, forget the suspicion.
    assert judge_pin("P1", {"P1"}, suspect, 20.0, 2.0) == (False, None)
