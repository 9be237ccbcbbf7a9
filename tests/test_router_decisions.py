"""The router's pure decisions (services/router/decisions.py), branch by branch, without NATS."""

from __future__ import annotations

import pytest

from services.router.assignment import ranking
from services.router.completion import StudyState
from services.router.decisions import (
    Claim,
    DeadLetter,
    Forward,
    Keep,
    Move,
    Reassign,
    Retry,
    Routed,
    newly_routed,
    plan_instance,
    record_instance,
    resolve_assignment,
    sends,
    settle_failure,
    settle_unread,
    unread_problem,
)
from services.router.rules import facts_of, parse_rules
from shared.config import CompletionConfig, ForwardConfig
from shared.contract.events import InstanceReceived, InstanceTags, utcnow

STUDY = "1.2.826.0.1.3680043.8.498.1"
MEMBERS = {"gw-a": 1.0, "gw-b": 1.0, "gw-c": 2.0}
ORDER = ranking(STUDY, MEMBERS)  # the study's preference order over the members


def _event(sop: str = "1.2.3.1", digest: str = "a" * 64) -> InstanceReceived:
    return InstanceReceived(tags=InstanceTags(study_uid=STUDY, series_uid=f"{STUDY}.1", sop_uid=sop, modality="CT",
                                              series_description="AX", patient_id="P1"),
                            transfer_syntax_uid="1.2.840.10008.1.2.1", digest=digest, size=10, backend="staging",
                            calling_ae="CT1", called_ae="DICOMFLOW", received_at=utcnow())


# --- sticky assignment ----------------------------------------------------------------------------------------

def test_a_recorded_member_of_the_group_is_kept_even_when_down():
    assert resolve_assignment(STUDY, ORDER[1], MEMBERS, healthy=[]) == Keep(ORDER[1])


def test_a_new_study_is_claimed_for_its_first_healthy_choice():
    assert resolve_assignment(STUDY, None, MEMBERS, healthy=MEMBERS) == Claim(ORDER[0])
    assert resolve_assignment(STUDY, None, MEMBERS, healthy=ORDER[1:]) == Claim(ORDER[1])


def test_a_new_study_gets_its_first_choice_when_every_member_is_down():
    assert resolve_assignment(STUDY, None, MEMBERS, healthy=[]) == Claim(ORDER[0])


def test_a_new_study_passes_over_a_member_beyond_its_load_bound():
    loads = dict.fromkeys(MEMBERS, 0)
    loads[ORDER[0]] = 10
    assert resolve_assignment(STUDY, None, MEMBERS, MEMBERS, loads=loads, bound=1.05) == Claim(ORDER[1])
    assert resolve_assignment(STUDY, None, MEMBERS, MEMBERS, loads=loads, bound=0) == Claim(ORDER[0])


def test_a_study_whose_member_left_the_group_moves_whole_even_with_nothing_healthy():
    assert resolve_assignment(STUDY, "gw-gone", MEMBERS, healthy=MEMBERS) == Move("gw-gone", ORDER[0])
    assert resolve_assignment(STUDY, "gw-gone", MEMBERS, healthy=[]) == Move("gw-gone", ORDER[0])


def test_a_study_moved_off_a_down_member_goes_to_a_healthy_one_or_nowhere():
    down = ORDER[0]
    assert resolve_assignment(STUDY, down, MEMBERS, healthy=MEMBERS, exclude=[down]) == Move(down, ORDER[1])
    assert resolve_assignment(STUDY, down, MEMBERS, healthy=[ORDER[2]], exclude=[down]) == Move(down, ORDER[2])
    # The down member counted healthy (a stale record) is still not a place to move to.
    assert resolve_assignment(STUDY, down, MEMBERS, healthy=[down], exclude=[down]) is None
    assert resolve_assignment(STUDY, down, MEMBERS, healthy=[], exclude=[down]) is None


def test_a_study_alone_in_a_one_member_group_has_nowhere_to_move():
    assert resolve_assignment(STUDY, "gw-a", {"gw-a": 1.0}, healthy=["gw-a"], exclude=["gw-a"]) is None


# --- a failed send --------------------------------------------------------------------------------------------

FWD = ForwardConfig(backoff_initial_s=1, backoff_max_s=8, max_attempts=5)


def test_a_failed_plain_target_job_is_retried_with_the_one_backoff_then_dead_lettered():
    assert [settle_failure(n, None, FWD, "refused") for n in (1, 2, 3, 4)] == [Retry(1), Retry(2), Retry(4), Retry(8)]
    assert settle_failure(5, None, FWD, "refused") == DeadLetter("refused")
    assert settle_failure(9, "wait", FWD, "refused") == DeadLetter("refused")


def test_a_waiting_group_retries_where_it_is():
    assert settle_failure(3, "wait", FWD, "refused") == Retry(4)


def test_a_reassigning_group_moves_the_study_from_the_second_failure_with_a_fallback():
    assert settle_failure(1, "reassign", FWD, "refused") == Retry(1)  # one refusal is not a dead gateway
    assert settle_failure(2, "reassign", FWD, "refused") == Reassign(Retry(2))
    assert settle_failure(5, "reassign", FWD, "refused") == Reassign(DeadLetter("refused"))


def test_what_reading_the_copies_came_to():
    assert unread_problem(["missing"]) == "missing"
    assert unread_problem([]) == "missing"  # no copy to try at all
    assert unread_problem(["missing", "corrupt"]) == "corrupt"  # staged copy released, the placement's corrupt
    assert unread_problem(["corrupt", "unreadable", "missing"]) == "unreadable"  # a copy not read may be good


def test_a_missing_or_corrupt_job_is_dead_lettered_at_once_an_unreadable_one_retried():
    assert settle_unread("missing", 1, FWD, "gone") == DeadLetter("gone")
    assert settle_unread("corrupt", 1, FWD, "bad") == DeadLetter("bad")
    assert [settle_unread("unreadable", n, FWD, "EIO") for n in (1, 2, 4)] == [Retry(1), Retry(2), Retry(8)]
    assert settle_unread("unreadable", 5, FWD, "EIO") == DeadLetter("EIO")


# --- route planning -------------------------------------------------------------------------------------------

RULES = parse_rules("""
rules:
  - name: stream
    match: {Modality: CT}
    action: forward
    to: [pacs, archive]
    then: continue
  - name: hold
    match: {Modality: CT}
    action: quarantine
    then: continue
  - name: later
    match: {Modality: CT}
    action: forward
    to: [ai]
    when: complete
    completion: {quiet_s: 7}
    then: continue
  - name: nothing
    match: {Modality: CT}
    action: drop
""", ["pacs", "archive", "ai"])
DEFAULT = CompletionConfig(quiet_s=60)


def _plan(event: InstanceReceived | None = None, seq: int = 4):
    event = event or _event()
    return plan_instance(RULES.evaluate(facts_of(event.tags, event.calling_ae, event.called_ae)), event, seq, DEFAULT)


def test_the_plan_lists_streaming_forwards_quarantines_and_the_completion_policy():
    plan = _plan()
    assert plan.forwards == (Forward("pacs", "stream"), Forward("archive", "stream"))
    assert plan.quarantines == ("hold",)
    assert plan.on_complete is True
    assert plan.policy.quiet_s == 7
    assert (plan.arrival.sop_uid, plan.arrival.seq, plan.arrival.patient_id) == ("1.2.3.1", 4, "P1")


def test_no_matching_rule_plans_nothing_and_the_default_completion():
    plan = plan_instance([], _event(), 1, DEFAULT)
    assert (plan.forwards, plan.quarantines, plan.on_complete, plan.policy) == ((), (), False, DEFAULT)


def test_recording_an_instance_announces_each_new_destination_once():
    plan = _plan()
    routed = [Routed("pacs", "", "stream"), Routed("gw-a", "gws", "stream"), Routed("pacs", "", "other")]
    after, fresh = record_instance(None, plan, 100.0, routed)
    assert fresh == [Routed("pacs", "", "stream"), Routed("gw-a", "gws", "stream")]
    assert after.targets == ["pacs", "gw-a"] and after.count == 1
    # The state it was given is never changed: a compare-and-set retry can run it again.
    again, fresh_again = record_instance(after, _plan(_event("1.2.3.2"), 5), 101.0, routed)
    assert fresh_again == [] and again.count == 2 and after.count == 1
    assert newly_routed(after, routed) == [] and newly_routed(None, routed) == fresh


def test_a_redelivered_instance_writes_nothing_unless_it_brings_a_new_destination():
    plan = _plan()
    st, _ = record_instance(None, plan, 100.0, [Routed("pacs", "", "stream")])
    assert record_instance(st, plan, 101.0, [Routed("pacs", "", "stream")]) == (None, [])
    after, fresh = record_instance(st, plan, 101.0, [Routed("gw-b", "gws", "stream")])
    assert fresh == [Routed("gw-b", "gws", "stream")] and after.targets == ["pacs", "gw-b"] and after.count == 1


@pytest.mark.parametrize("state", [None, StudyState(study_uid=STUDY, targets=["pacs"])])
def test_record_instance_is_deterministic(state):
    plan = _plan()
    routed = [Routed("pacs", "", "stream"), Routed("archive", "", "stream")]
    assert record_instance(state, plan, 5.0, routed) == record_instance(state, plan, 5.0, routed)


def test_a_batch_is_sent_in_pieces_of_at_most_its_byte_limit():
    assert sends([10] * 5, 100) == [range(0, 5)]  # small instances: one send, as before
    assert sends([60, 60, 30, 10, 200, 5], 100) == [range(0, 1), range(1, 4), range(4, 5), range(5, 6)]
    assert sends([300], 100) == [range(0, 1)]  # one over the limit goes alone
    assert sends([], 100) == []
