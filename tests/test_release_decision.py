"""The staging releaser's decision, without I/O: which staged object may go, and why the others stay."""

import pytest

from services.releaser import decision as d
from shared.storage.objectstore import StoredObject

A, B, C = "a" * 64, "b" * 64, "c" * 64
OLD, NOT_AFTER = 100.0, 1000.0


def obj(digest: str, mtime: float = OLD) -> StoredObject:
    return StoredObject(digest, 10, mtime)


@pytest.mark.parametrize("holds,mtime,placed,expected", [
    (d.Holds(), OLD, True, d.Release()),
    (d.Holds(instance_events=frozenset({A})), OLD, True, d.Keep(d.INSTANCE_EVENT)),
    (d.Holds(forward_jobs=frozenset({A})), OLD, True, d.Keep(d.FORWARD_JOB)),
    (d.Holds(dead_letters=frozenset({A})), OLD, True, d.Keep(d.DEAD_LETTER)),
    # a dead letter outranks the job that is being replayed from it (both present while a replay runs)
    (d.Holds(forward_jobs=frozenset({A}), dead_letters=frozenset({A})), OLD, True, d.Keep(d.DEAD_LETTER)),
    (d.Holds(), NOT_AFTER + 0.001, True, d.Keep(d.YOUNG)),  # a resend touched it: its event may be on its way
    (d.Holds(), NOT_AFTER, True, d.Release()),  # exactly at the grace's edge: written before the view was taken
    (d.Holds(), OLD, False, d.Keep(d.NOT_PLACED)),  # rejected or not yet placed: the staged copy is the only one
    (d.Holds(instance_events=frozenset({B}), forward_jobs=frozenset({C})), OLD, True, d.Release()),  # others' refs
])
def test_verdict(holds, mtime, placed, expected):
    assert d.verdict(obj(A, mtime), holds, NOT_AFTER, placed) == expected


def test_held_by_needs_no_placement_answer():
    assert d.held_by(obj(A), d.Holds(instance_events=frozenset({A})), NOT_AFTER) == d.INSTANCE_EVENT
    assert d.held_by(obj(A), d.Holds(), NOT_AFTER) is None


def test_ack_floor_is_the_lower_group_and_a_missing_consumer_holds_everything():
    assert d.ack_floor({"store": 40, "router": 12}) == 12
    assert d.ack_floor({"store": 40}) == 40
    assert d.ack_floor({"store": 40, "router": None}) == 0  # a router that never started: nothing is done
    assert d.ack_floor({}) == 0


def test_pending_digests_are_the_events_above_their_partitions_floor():
    events = [(5, 0, A), (9, 1, B), (12, 0, C), (13, 1, A)]
    assert d.pending_digests(events, {0: 5, 1: 13}) == {C}
    assert d.pending_digests(events, {0: 12, 1: 9}) == {A}
    assert d.pending_digests(events, {}) == {A, B, C}  # an unknown partition's floor is 0


def test_shared_object_stays_while_any_event_naming_it_is_pending():
    # two instances (or two sends of one) with the same bytes: one acknowledged, one not
    events = [(3, 2, A), (8, 2, A)]
    holds = d.Holds(instance_events=d.pending_digests(events, {2: 3}))
    assert d.verdict(obj(A), holds, NOT_AFTER, True) == d.Keep(d.INSTANCE_EVENT)
    holds = d.Holds(instance_events=d.pending_digests(events, {2: 8}))
    assert d.verdict(obj(A), holds, NOT_AFTER, True) == d.Release()


def test_required_groups():
    assert d.required_groups(False, []) == ("store",)
    assert d.required_groups(True, []) == ("store", "router")
    assert d.required_groups(False, ["store", "router"]) == ("store", "router")  # rules removed, events pending


def test_staging_that_is_a_placement_blocks_release_and_placements_exclude_it():
    policies = {"default": ["local"], "two": ["archive", "local", "dr"]}
    assert d.staging_is_placement("local", policies) == "default"
    assert d.staging_is_placement("staging", policies) is None
    assert d.placement_backends("local", policies) == ["archive", "dr"]


def test_a_deleted_instances_staged_copy_goes_once_nothing_pending_needs_it():
    """No placement holds a deleted instance's bytes (the deletion removed them): a deletion event naming the digest
    lets the staged copy go, after the same reference and grace checks; without one it is kept as the only copy."""
    assert d.verdict(obj(A, OLD), d.Holds(), NOT_AFTER, placed=False, deleted=True) == d.Release()
    assert d.verdict(obj(A, OLD), d.Holds(), NOT_AFTER, placed=False, deleted=False) == d.Keep(d.NOT_PLACED)
    pending = d.Holds(instance_events=frozenset({A}))  # resent since the deletion: the store still needs the bytes
    assert d.verdict(obj(A, OLD), pending, NOT_AFTER, placed=False, deleted=True) == d.Keep(d.INSTANCE_EVENT)
    assert d.verdict(obj(A, NOT_AFTER + 1), d.Holds(), NOT_AFTER, placed=False, deleted=True) == d.Keep(d.YOUNG)
