"""The router's pure cores: rules (every operator, validation with lines), completion, weighted
rendezvous assignment; and the `dicomflow rules` dry-run tester on real files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid

import pytest
import yaml

from dicomflow.synthetic import write_study
from services.router.assignment import choose, ranking
from services.router.completion import RECENT, Arrival, due, mark_completed, record_arrival, summarize
from services.router.rules import RulesError, completion_for, facts_of, parse_rules
from shared.config import CompletionConfig
from shared.contract.events import InstanceTags
from tests.helpers import REPO

TAGS = InstanceTags(study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    modality="CT", institution_name="General Hospital", body_part="HEAD",
                    series_description="AXIAL 2mm", series_number=3, instance_number=12, accession_number="")
FACTS = facts_of(TAGS, calling_ae="CT1", called_ae="DICOMFLOW")


def one(match: str) -> bool:
    rs = parse_rules(f"rules:\n  - name: r\n    match: {match}\n    action: drop\n")
    return bool(rs.evaluate(FACTS))


@pytest.mark.parametrize("match, expected", [
    ("{Modality: CT}", True), ("{Modality: MR}", False),
    ("{Modality: {eq: CT}}", True), ("{Modality: {ne: CT}}", False), ("{Modality: {ne: MR}}", True),
    ("{SeriesDescription: {regex: '^AX'}}", True), ("{SeriesDescription: {regex: 'COR'}}", False),
    ("{SeriesNumber: {gt: 2}}", True), ("{SeriesNumber: {gt: 3}}", False), ("{SeriesNumber: {ge: 3}}", True),
    ("{InstanceNumber: {lt: 12}}", False), ("{InstanceNumber: {le: 12}}", True),
    ("{SeriesNumber: {ge: 2, lt: 4}}", True), ("{SeriesNumber: 3}", True), ("{SeriesNumber: 3.0}", True),
    ("{BodyPartExamined: {in: [HEAD, BRAIN]}}", True), ("{BodyPartExamined: {in: [CHEST]}}", False),
    ("{BodyPartExamined: {not_in: [CHEST]}}", True), ("{BodyPartExamined: {not_in: [HEAD]}}", False),
    ("{AccessionNumber: {present: true}}", False), ("{AccessionNumber: {present: false}}", True),
    ("{InstitutionName: {present: true}}", True),
    ("{AccessionNumber: {eq: X}}", False), ("{AccessionNumber: {ne: X}}", True),
    ("{calling_ae: CT1}", True), ("{calling_ae: CT2}", False), ("{called_ae: DICOMFLOW}", True),
    ("{institution: General Hospital}", True), ("{institution: {regex: '(?i)general'}}", True),
    ("{Modality: CT, calling_ae: CT2}", False),  # every condition must hold
    ("{StudyDescription: {gt: 1}}", False),  # numeric test on an absent/non-numeric value
])
def test_every_operator(match, expected):
    assert one(match) is expected


def test_first_match_and_all_matches():
    text = """
rules:
  - {name: a, match: {Modality: CT}, action: forward, to: g, then: continue}
  - {name: b, match: {Modality: CT}, action: forward, to: t1, when: complete}
  - {name: c, action: quarantine}
  - {name: d, match: {Modality: MR}, action: drop}
"""
    rs = parse_rules(text, "r.yaml", ["g", "t1"])
    assert [r.name for r in rs.evaluate(FACTS)] == ["a", "b"]  # b stops (default)
    mr = facts_of(TAGS.model_copy(update={"modality": "MR"}))
    assert [r.name for r in rs.evaluate(mr)] == ["c"]
    assert rs.destinations() == {"g", "t1"}


def test_rule_completion_overrides_the_default():
    rs = parse_rules("rules:\n  - {name: a, action: drop, completion: {quiet_s: 5, min_series: 2}}\n"
                     "  - {name: b, action: drop}\n")
    default = CompletionConfig(quiet_s=60)
    assert completion_for(rs.evaluate(FACTS), default).quiet_s == 5
    assert completion_for([rs.rules[1]], default) is default


@pytest.mark.parametrize("text, line, reason", [
    ("rules:\n  - name: a\n    match:\n      Foo: 1\n    action: drop\n", 4, "cannot match on 'Foo'"),
    ("rules:\n  - name: a\n    match: {Modality: {like: CT}}\n    action: drop\n", 3, "unknown operator 'like'"),
    ("rules:\n  - name: a\n    match:\n      SeriesNumber: {gt: x}\n    action: drop\n", 4, "needs a number"),
    ("rules:\n  - name: a\n    match:\n      Modality: {regex: '('}\n    action: drop\n", 4, "invalid regular expression"),
    ("rules:\n  - name: a\n    match:\n      Modality: {in: []}\n    action: drop\n", 4, "non-empty list"),
    ("rules:\n  - name: a\n    match:\n      Modality: {present: maybe}\n    action: drop\n", 4, "true or false"),
    ("rules:\n  - name: a\n    action: forward\n    to: nowhere\n", 4, "unknown target or group 'nowhere'"),
    ("rules:\n  - name: a\n    action: forward\n", 2, "needs 'to'"),
    ("rules:\n  - name: a\n    action: explode\n", 3, "action must be one of"),
    ("rules:\n  - name: a\n    action: drop\n    when: later\n", 4, "when must be one of"),
    ("rules:\n  - name: a\n    action: drop\n  - name: a\n    action: drop\n", 4, "duplicate name"),
    ("rules:\n  - name: a\n    action: drop\n    completion:\n      quiet_s: -1\n", 5, "completion.quiet_s"),
    ("rules:\n  - name: a\n    action: drop\n    colour: red\n", 4, "unknown key 'colour'"),
    ("rules:\n  - action: drop\n", 2, "rule without a name"),
    ("rules: [\n", 2, "invalid YAML"),
])
def test_invalid_rules_name_line_and_reason(text, line, reason):
    with pytest.raises(RulesError) as err:
        parse_rules(text, "rules.yaml", ["gw"])
    assert any(p.startswith(f"rules.yaml:{line}:") and reason in p for p in err.value.problems), err.value.problems


def test_every_problem_is_reported_at_once():
    text = "rules:\n  - name: a\n    match: {Foo: 1}\n    action: drop\n  - name: b\n    action: nope\n"
    with pytest.raises(RulesError) as err:
        parse_rules(text, "r.yaml")
    assert len(err.value.problems) == 2


# --- completion -------------------------------------------------------------------------------------------------

def _arr(sop: str, series: str = "s1", desc: str = "AX", seq: int = 1) -> Arrival:
    return Arrival("1.2.3", series, sop, "d" * 64, seq, desc, "CT")


def test_quiet_period_generations_and_redelivery():
    pol = CompletionConfig(quiet_s=10)
    st, changed = record_arrival(None, _arr("1"), 100.0, pol, False)
    st, changed2 = record_arrival(st, _arr("2", seq=2), 105.0, pol, False)
    assert changed and changed2 and st.count == 2 and st.gen == 1
    same, changed3 = record_arrival(st, _arr("2", seq=2), 106.0, pol, False)
    assert not changed3 and same.count == 2  # redelivery changes nothing
    assert due(st, 114.9, pol) is None and due(st, 115.0, pol).reason == "quiet"
    done = mark_completed(st, 1, seq=2, count=2)
    assert done.completed_gen == 1 and not done.is_open and due(done, 999, pol) is None
    assert mark_completed(done, 1, seq=2, count=2) is None  # another member recorded it already
    again, _ = record_arrival(done, _arr("3", seq=9), 200.0, pol, False)
    assert again.gen == 2 and again.is_open and due(again, 210.0, pol).reason == "quiet"


def test_redelivery_after_completion_does_not_reopen_even_when_forgotten():
    pol = CompletionConfig(quiet_s=1)
    st = None
    for i in range(1, RECENT + 11):  # more instances than the redelivery filter remembers
        st, _ = record_arrival(st, _arr(str(i), seq=i), float(i), pol, False)
    assert st.count == RECENT + 10 and len(st.recent) == RECENT and len(st.model_dump_json()) < 16_000
    done = mark_completed(st, 1, seq=st.max_seq, count=st.count)
    old, changed = record_arrival(done, _arr("1", seq=1), 999.0, pol, False)  # evicted from the filter
    assert not changed and not old.is_open
    new, changed = record_arrival(done, _arr("x", seq=st.max_seq + 1), 999.0, pol, False)
    assert changed and new.gen == 2


def test_instance_between_decision_and_mark_reopens():
    pol = CompletionConfig(quiet_s=1)
    st, _ = record_arrival(None, _arr("1"), 0.0, pol, False)
    late, _ = record_arrival(st, _arr("2", seq=2), 5.0, pol, False)  # arrived while gen 1 was being announced
    marked = mark_completed(late, gen=1, seq=1, count=1)
    assert marked.completed_gen == 1 and marked.gen == 2 and marked.is_open
    covered = mark_completed(late, gen=1, seq=2, count=2)  # the recount had seen it: nothing re-opens
    assert covered.completed_gen == 1 and not covered.is_open


def test_summary_counts_each_instance_once():
    items = [(1, "s1", "a", "d1", "AX", "CT"), (2, "s1", "b", "d2", "AX", "CT"), (3, "s2", "c", "d3", "COR", "CT"),
             (7, "s1", "a", "d1", "AX", "CT")]  # the same instance stored again
    summary = summarize(items)
    assert summary.instances == 3 and summary.last_seq == 7
    assert {k: (v.n, v.description) for k, v in summary.series.items()} == {"s1": (2, "AX"), "s2": (1, "COR")}


def test_required_series_min_series_and_force_actions():
    pol = CompletionConfig(quiet_s=5, required_series=["AX", "COR"], force_after_s=100, force_action="process")
    st, _ = record_arrival(None, _arr("1", "s1", "AX"), 0.0, pol, False)
    assert due(st, 50, pol) is None  # quiet, but COR missing
    forced = due(st, 100, pol)
    assert forced.reason == "forced" and forced.incomplete and not forced.discard
    st2, _ = record_arrival(st, _arr("2", "s2", "cor "), 10.0, pol, False)
    assert due(st2, 15, pol).reason == "quiet" and not due(st2, 15, pol).incomplete
    discard = CompletionConfig(quiet_s=5, min_series=3, force_after_s=20, force_action="discard")
    st3, _ = record_arrival(None, _arr("1"), 0.0, discard, False)
    assert due(st3, 19, discard) is None and due(st3, 20, discard).discard
    wait = CompletionConfig(quiet_s=5, min_series=3, force_after_s=20, force_action="wait")
    st4, _ = record_arrival(None, _arr("1"), 0.0, wait, False)
    assert due(st4, 10_000, wait) is None


# --- assignment -------------------------------------------------------------------------------------------------

def _uids(n: int) -> list[str]:
    vendor = [f"1.2.840.113619.2.55.3.{604688119 + i}.{i % 977}.{1700000000 + i}" for i in range(n // 2)]
    return vendor + [f"2.25.{uuid.UUID(int=i * 7919 + 1).int}" for i in range(n - n // 2)]


def test_weights_set_the_share_and_a_join_moves_only_its_share():
    uids = _uids(6000)
    w = {"a": 1.0, "b": 1.0, "c": 2.0}
    shares = {t: sum(1 for u in uids if choose(u, w) == t) / len(uids) for t in w}
    assert math.isclose(shares["c"], 0.5, abs_tol=0.03) and math.isclose(shares["a"], 0.25, abs_tol=0.03)
    three = {"a": 1.0, "b": 1.0, "c": 1.0}
    four = {**three, "d": 1.0}
    moved = [u for u in uids if choose(u, three) != choose(u, four)]
    assert all(choose(u, four) == "d" for u in moved)  # only to the newcomer
    assert 0.21 < len(moved) / len(uids) < 0.29


def test_unhealthy_members_are_skipped_and_all_down_keeps_the_first_choice():
    w = {"a": 1.0, "b": 1.0, "c": 1.0}
    uid = "1.2.3.4"
    order = ranking(uid, w)
    assert choose(uid, w, healthy=order[1:]) == order[1]
    assert choose(uid, w, healthy=[]) == order[0]
    assert choose(uid, w, exclude=[order[0]]) == order[1]


def test_bounded_loads_pass_a_full_member_over():
    w = {"a": 1.0, "b": 1.0, "c": 1.0}
    uid = "1.2.3.4"
    first, second, _ = ranking(uid, w)
    assert choose(uid, w, loads={first: 0, second: 0}, bound=1.05) == first
    # The first choice already holds far more than its share of open studies: the next one takes it.
    assert choose(uid, w, loads={first: 10, second: 0}, bound=1.05) == second
    assert choose(uid, w, loads={first: 10, second: 0}, bound=0) == first  # bound off: pure rendezvous
    assert choose(uid, w, healthy=[first], loads={first: 10}, bound=1.05) == first  # the only healthy member


# --- the dry-run tester -------------------------------------------------------------------------------------------

def _cli(tmp_path, rules: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "rules.yaml").write_text(rules)
    cfg = {"data_dir": str(tmp_path / "data"), "router": {
        "rules_file": str(tmp_path / "rules.yaml"),
        "targets": {"gw1": {"port": 11113}, "gw2": {"port": 11114}, "pacs": {"kind": "dicomweb", "url": "http://x"}},
        "groups": {"gateways": {"members": {"gw1": 1, "gw2": 1}}}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "dicomflow", "--config", str(tmp_path / "cfg.yaml"), "rules", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


RULES = """
rules:
  - name: head-ct
    match: {Modality: CT, BodyPartExamined: HEAD, calling_ae: CT1}
    action: forward
    to: gateways
    then: continue
  - name: archive
    action: forward
    to: pacs
    when: complete
"""


def test_rules_test_on_a_folder_prints_matches_and_destinations(tmp_path):
    uid, files = write_study(tmp_path / "study", 2)
    res = _cli(tmp_path, RULES, "test", str(tmp_path / "study"), "--calling-ae", "CT1", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert len(out) == 2 and all(r["study_uid"] == uid for r in out)
    first = out[0]["matched"]
    assert [m["rule"] for m in first] == ["head-ct", "archive"]
    assert first[0]["to"] == [{"group": "gateways", "target": choose(uid, {"gw1": 1, "gw2": 1}),
                               "note": first[0]["to"][0]["note"]}]
    assert first[1]["when"] == "complete" and first[1]["to"] == [{"target": "pacs"}]
    other = _cli(tmp_path, RULES, "test", str(files[0]), "--calling-ae", "MR7")
    assert other.returncode == 0 and "'archive'" in other.stdout and "'head-ct'" not in other.stdout
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    junk = _cli(tmp_path, RULES, "test", str(tmp_path / "junk.dcm"))
    assert junk.returncode == 0 and "not routable" in junk.stdout


def test_rules_check_fails_with_line_and_reason(tmp_path):
    res = _cli(tmp_path, "rules:\n  - name: a\n    action: forward\n    to: nowhere\n", "check")
    assert res.returncode == 2
    assert "rules.yaml:4:" in res.stderr and "unknown target or group 'nowhere'" in res.stderr
    assert _cli(tmp_path, RULES, "check").returncode == 0


def test_router_refuses_to_start_on_invalid_rules(tmp_path):
    (tmp_path / "rules.yaml").write_text("rules:\n  - name: a\n    match: {Modality: {regex: '['}}\n    action: drop\n")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "telemetry": {"metrics_port": 0},
                                                       "router": {"rules_file": str(tmp_path / "rules.yaml")}}))
    res = subprocess.run([sys.executable, "-m", "dicomflow", "--config", str(tmp_path / "cfg.yaml"), "router"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "rules.yaml:3:" in res.stderr and "invalid regular expression" in res.stderr
