"""The chaos suite's pure core: the killer's schedule and the verdict, without processes."""

from __future__ import annotations

import pytest

from tests.chaos_core import (
    KINDS,
    NATS,
    RECEIVER,
    STORE,
    Completion,
    SentInstance,
    StoredInstance,
    kill_schedule,
    percentile,
    recovery_times,
    summarise,
    verdict,
)


def test_schedule_is_a_function_of_the_seed():
    a = kill_schedule(7, KINDS, 60, 8)
    assert a == kill_schedule(7, KINDS, 60, 8)
    assert a != kill_schedule(8, KINDS, 60, 8)


def test_schedule_hits_every_kind_and_spaces_the_kills():
    kills = kill_schedule(3, KINDS, 40, 8)
    assert {k.kind for k in kills} == set(KINDS)
    slot = 40 / 8
    for i, k in enumerate(kills):
        assert slot * i + 0.15 * slot - 1e-6 <= k.at_s <= slot * i + 0.85 * slot + 1e-6
    gaps = [b.at_s - a.at_s for a, b in zip(kills, kills[1:], strict=False)]
    assert min(gaps) >= 0.3 * slot - 1e-6


def test_schedule_refuses_what_it_cannot_kill():
    with pytest.raises(ValueError, match="unknown kinds"):
        kill_schedule(1, ["osd"], 10, 2)
    with pytest.raises(ValueError):
        kill_schedule(1, [STORE], 0, 2)
    assert kill_schedule(1, [STORE], 10, 0) == []


def _run(n=6):
    sent = {f"1.{i}": SentInstance(f"1.{i}", "9.1" if i < 3 else "9.2", f"d{i}") for i in range(n)}
    stored = [StoredInstance(s.sop, s.study, s.digest) for s in sent.values()]
    exported = {s.sop: s.digest for s in sent.values()}
    completions = [Completion("9.1", 3), Completion("9.2", n - 3)]
    return sent, stored, exported, completions


def test_a_clean_run_is_ok():
    sent, stored, exported, completions = _run()
    v = verdict(sent, sent.keys(), stored, exported, completions, forwarded=sent.keys())
    assert v.ok, v.problems()
    assert (v.sent, v.acknowledged, v.stored) == (6, 6, 6)


def test_lost_corrupt_conflicting_phantom_and_unforwarded_are_named():
    sent, stored, exported, completions = _run()
    stored = [r for r in stored if r.sop != "1.0"]                     # acknowledged, not catalogued
    stored.append(StoredInstance("1.1", "9.1", "other"))               # a second content for one SOP
    stored.append(StoredInstance("7.7", "9.1", "x"))                   # never sent
    exported["1.2"] = "flipped"                                        # bytes read back differ
    del exported["1.4"]                                                # catalogued, but export has nothing
    v = verdict(sent, sent.keys(), stored, exported, completions, forwarded=["1.0", "1.1", "1.2"])
    assert not v.ok
    assert v.lost == ["1.0", "1.4"]
    assert v.conflicting == ["1.1"]
    assert v.corrupt == ["1.1", "1.2"]
    assert v.phantoms == ["7.7"]
    assert v.not_forwarded == ["1.3", "1.4", "1.5"]
    assert "lost: 2" in v.problems()


def test_unacknowledged_instances_may_be_stored_or_not():
    sent, stored, exported, completions = _run()
    v = verdict(sent, ["1.1", "1.2", "1.3", "1.4", "1.5"], stored, exported, completions)
    assert v.ok and v.stored_unacknowledged == 1
    # Not acknowledged and not stored: not lost either (the modality knows it was not taken).
    v = verdict(sent, ["1.1", "1.2", "1.3", "1.4", "1.5"], stored[1:], {k: d for k, d in exported.items()
                                                                       if k != "1.0"},
                [Completion("9.1", 2), Completion("9.2", 3)])
    assert v.ok, v.problems()


def test_each_study_completes_exactly_once_with_what_was_stored():
    sent, stored, exported, _ = _run()
    twice = [Completion("9.1", 3), Completion("9.1", 3), Completion("9.2", 3)]
    assert verdict(sent, sent, stored, exported, twice).completion_errors == {"9.1": "completed 2 times"}
    never = [Completion("9.1", 3)]
    assert verdict(sent, sent, stored, exported, never).completion_errors == {"9.2": "completed 0 times"}
    short = [Completion("9.1", 2), Completion("9.2", 3)]
    assert "counted 2" in verdict(sent, sent, stored, exported, short).completion_errors["9.1"]
    # Completed early, then re-opened and completed again with everything: once, and the re-open is counted.
    reopened = [Completion("9.1", 2), Completion("9.1", 3, updated=True), Completion("9.2", 3)]
    v = verdict(sent, sent, stored, exported, reopened)
    assert v.ok and v.reopened == 1


def test_recovery_is_until_the_last_instance_a_kill_delayed_is_stored():
    # kill at 3: "b" was held by the killed worker (acked 2.0, stored 7.5), "c" waited for the new owner.
    acked = {"a": 1.0, "b": 2.0, "c": 5.0, "d": 11.0, "e": 12.0}
    stored = {"a": 1.1, "b": 7.5, "c": 9.0, "d": 11.2, "e": 20.0}
    assert recovery_times([3.0], acked, stored) == [pytest.approx(17.0)]      # e too: no later kill to blame
    assert recovery_times([3.0, 10.0], acked, stored) == [pytest.approx(6.0), pytest.approx(10.0)]
    # Nothing delayed (catalogued within normal_s of the answer): 0.
    assert recovery_times([3.0], {"a": 1.0, "c": 5.0}, {"a": 1.1, "c": 5.5}) == [0.0]
    # Delayed before the kill, not by it: not counted.
    assert recovery_times([3.0], {"a": 1.0}, {"a": 2.9}) == [0.0]
    assert recovery_times([3.0, 10.0], acked, {"a": 1.1, "c": 9.0, "d": 11.2, "e": 12.1}) == [None, 0.0]
    assert recovery_times([], acked, stored) == []


def test_percentile_and_summary():
    assert percentile([], 95) is None
    assert percentile([3, 1, 2], 50) == 2
    assert percentile(list(range(1, 21)), 95) == 19
    sent, stored, exported, completions = _run()
    ok = verdict(sent, sent, stored, exported, completions)
    row = summarise("store", [ok, ok], [1.0, 2.0, None, 12.0])
    assert row["runs"] == 2 and row["kills"] == 4 and row["lost"] == 0 and row["acknowledged"] == 12
    assert row["unrecovered_kills"] == 1 and row["recovery_p95_s"] == 12.0 and row["recovery_p50_s"] == 2.0
    assert NATS in KINDS and RECEIVER in KINDS
