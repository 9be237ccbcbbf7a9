"""Routing rules: parsed and validated from one YAML file, matched against an instance's facts.

Pure: text in, :class:`RuleSet` out (or :class:`RulesError` listing every problem with its line);
facts in, matches out. A rule::

    - name: ct-to-gateways
      match:                          # every condition must hold; no match: every instance
        Modality: CT                  # equality
        SeriesDescription: {regex: "^AX"}
        SeriesNumber: {ge: 2, lt: 900}
        BodyPartExamined: {in: [HEAD, BRAIN]}
        AccessionNumber: {present: true}
        calling_ae: CT1               # also called_ae, institution
      action: forward                 # forward | drop | quarantine
      to: gateways                    # a target or a target group, or a list of them
      when: instance                  # instance: as it arrives (streaming); complete: when the study completes
      then: stop                      # stop: first match wins; continue: later rules are evaluated too
      completion: {quiet_s: 30}       # overrides router.completion for studies this rule matches
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from shared.config import CompletionConfig
from shared.contract.events import InstanceTags

# DICOM keyword -> InstanceTags field: the tags the ingest reads (rules can only see those).
TAG_FIELDS = {
    "StudyInstanceUID": "study_uid",
    "SeriesInstanceUID": "series_uid",
    "SOPInstanceUID": "sop_uid",
    "SOPClassUID": "sop_class_uid",
    "PatientID": "patient_id",
    "Modality": "modality",
    "InstitutionName": "institution_name",
    "BodyPartExamined": "body_part",
    "SeriesDescription": "series_description",
    "StudyDescription": "study_description",
    "AccessionNumber": "accession_number",
    "SeriesNumber": "series_number",
    "InstanceNumber": "instance_number",
}
ASSOCIATION_FIELDS = ("calling_ae", "called_ae", "institution")
OPERATORS = ("eq", "ne", "regex", "in", "not_in", "gt", "ge", "lt", "le", "present")
ACTIONS = ("forward", "drop", "quarantine")
RULE_KEYS = {"name", "match", "action", "to", "when", "then", "completion", "description"}


class RulesError(ValueError):
    """The rules are invalid; ``problems`` holds one ``source:line: reason`` per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Condition:
    """One test on one fact: ``op`` is one of :data:`OPERATORS`."""

    key: str
    op: str
    value: Any

    def holds(self, facts: Mapping[str, Any]) -> bool:
        """Whether the fact satisfies this condition (an absent fact satisfies only ``present: false``)."""
        v = facts.get(self.key)
        present = v is not None and v != ""
        if self.op == "present":
            return present == bool(self.value)
        if not present:
            return self.op in ("ne", "not_in")
        if self.op in ("gt", "ge", "lt", "le"):
            num = _number(v)
            if num is None:
                return False
            return {"gt": num > self.value, "ge": num >= self.value, "lt": num < self.value,
                    "le": num <= self.value}[self.op]
        if self.op == "regex":
            return self.value.search(str(v)) is not None
        if self.op in ("eq", "ne"):
            equal = _equal(v, self.value)
            return equal if self.op == "eq" else not equal
        inside = any(_equal(v, x) for x in self.value)
        return inside if self.op == "in" else not inside


@dataclass(frozen=True)
class Rule:
    """One validated rule."""

    name: str
    line: int
    conditions: tuple[Condition, ...]
    action: str
    to: tuple[str, ...] = ()
    when: str = "instance"
    stop: bool = True
    completion: CompletionConfig | None = None

    def matches(self, facts: Mapping[str, Any]) -> bool:
        """Whether every condition holds."""
        return all(c.holds(facts) for c in self.conditions)


@dataclass(frozen=True)
class RuleSet:
    """The rules of one file, in order."""

    rules: tuple[Rule, ...] = ()
    source: str = ""

    def evaluate(self, facts: Mapping[str, Any]) -> list[Rule]:
        """The rules that apply, in order: every match up to and including the first ``then: stop`` one."""
        out = []
        for rule in self.rules:
            if rule.matches(facts):
                out.append(rule)
                if rule.stop:
                    break
        return out

    def destinations(self) -> set[str]:
        """Every target or group some rule forwards to."""
        return {d for r in self.rules for d in r.to}


@dataclass
class _Problems:
    source: str
    items: list[str] = field(default_factory=list)

    def add(self, line: int, msg: str) -> None:
        self.items.append(f"{self.source}:{line}: {msg}")


def facts_of(tags: InstanceTags, calling_ae: str = "", called_ae: str = "") -> dict[str, Any]:
    """What rules can test for one instance: its routing tags by DICOM keyword plus the association."""
    facts: dict[str, Any] = {kw: getattr(tags, f) for kw, f in TAG_FIELDS.items()}
    facts["calling_ae"] = calling_ae.strip()
    facts["called_ae"] = called_ae.strip()
    facts["institution"] = tags.institution_name
    return facts


def completion_for(matched: Iterable[Rule], default: CompletionConfig) -> CompletionConfig:
    """The completion policy of a study: the first matching rule's own, else the global default."""
    for rule in matched:
        if rule.completion is not None:
            return rule.completion
    return default


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(str(v).strip())
    except ValueError:
        return None


def _equal(fact: Any, expected: Any) -> bool:
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        num = _number(fact)
        return num is not None and math.isclose(num, float(expected))
    return str(fact).strip() == str(expected).strip()


# --- parsing with line numbers -------------------------------------------------------------------------------

class _Node:
    """A YAML value with the (1-based) line it starts on."""

    __slots__ = ("value", "line")

    def __init__(self, value: Any, line: int):
        self.value = value
        self.line = line


def _convert(node: yaml.Node) -> _Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, tuple[_Node, _Node]] = {}
        for k, v in node.value:
            key = _convert(k)
            out[str(key.value)] = (key, _convert(v))
        return _Node(out, line)
    if isinstance(node, yaml.SequenceNode):
        return _Node([_convert(v) for v in node.value], line)
    return _Node(_scalar(node), line)


def _scalar(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _plain(node: _Node) -> Any:
    if isinstance(node.value, dict):
        return {k: _plain(v) for k, (_, v) in node.value.items()}
    if isinstance(node.value, list):
        return [_plain(v) for v in node.value]
    return node.value


def parse_rules(text: str, source: str = "rules", destinations: Iterable[str] | None = None) -> RuleSet:
    """Parse and validate a rules document; ``destinations`` are the known target and group names.

    Raises :class:`RulesError` listing every problem as ``source:line: reason``.
    """
    problems = _Problems(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise RulesError([f"{source}:{line}: invalid YAML: {getattr(exc, 'problem', exc)}"]) from exc
    if root is None:
        return RuleSet((), source)
    top = _convert(root)
    if isinstance(top.value, dict):
        if set(top.value) - {"rules"}:
            extra = sorted(set(top.value) - {"rules"})
            problems.add(top.value[extra[0]][0].line, f"unknown top-level key {extra[0]!r} (expected 'rules')")
        entry = top.value.get("rules")
        items = entry[1] if entry else _Node([], top.line)
    else:
        items = top
    if not isinstance(items.value, list):
        problems.add(items.line, "'rules' must be a list of rules")
        raise RulesError(problems.items)
    known = None if destinations is None else set(destinations)
    rules: list[Rule] = []
    names: dict[str, int] = {}
    for node in items.value:
        rule = _parse_rule(node, problems, known)
        if rule is None:
            continue
        if rule.name in names:
            problems.add(rule.line, f"rule {rule.name!r}: duplicate name (first on line {names[rule.name]})")
        names.setdefault(rule.name, rule.line)
        rules.append(rule)
    if problems.items:
        raise RulesError(problems.items)
    return RuleSet(tuple(rules), source)


def load_rules(path: str, destinations: Iterable[str] | None = None) -> RuleSet:
    """Read and validate a rules file (raises :class:`RulesError`, or OSError when unreadable)."""
    with open(path, encoding="utf-8") as fh:
        return parse_rules(fh.read(), path, destinations)


def _parse_rule(node: _Node, problems: _Problems, known: set[str] | None) -> Rule | None:
    if not isinstance(node.value, dict):
        problems.add(node.line, "a rule must be a mapping (name, match, action, ...)")
        return None
    fields = node.value
    before = len(problems.items)
    name_node = fields.get("name", (None, None))[1]
    if name_node is None or not isinstance(name_node.value, str) or not name_node.value.strip():
        problems.add(node.line, "rule without a name")
        name = f"#line{node.line}"
    else:
        name = name_node.value.strip()
    label = f"rule {name!r}"
    for key, (knode, _) in fields.items():
        if key not in RULE_KEYS:
            problems.add(knode.line, f"{label}: unknown key {key!r} (expected one of {', '.join(sorted(RULE_KEYS))})")
    conditions: list[Condition] = []
    match = fields.get("match")
    if match is not None:
        mnode = match[1]
        if mnode.value is None:
            pass
        elif not isinstance(mnode.value, dict):
            problems.add(mnode.line, f"{label}: 'match' must be a mapping of tag -> condition")
        else:
            for key, (knode, cnode) in mnode.value.items():
                conditions.extend(_parse_condition(label, key, knode, cnode, problems))
    action_node = fields.get("action", (None, None))[1]
    action = action_node.value if action_node is not None else None
    if action not in ACTIONS:
        problems.add(action_node.line if action_node else node.line,
                     f"{label}: action must be one of {', '.join(ACTIONS)}, not {action!r}")
    to: tuple[str, ...] = ()
    to_entry = fields.get("to")
    if to_entry is not None:
        tnode = to_entry[1]
        raw = _plain(tnode)
        raw = [raw] if isinstance(raw, str) else raw
        if not isinstance(raw, list) or not raw or not all(isinstance(x, str) and x for x in raw):
            problems.add(tnode.line, f"{label}: 'to' must be a target or group name, or a list of them")
        else:
            to = tuple(raw)
            if known is not None:
                for dest in to:
                    if dest not in known:
                        problems.add(tnode.line, f"{label}: unknown target or group {dest!r}"
                                                 f" (configured: {', '.join(sorted(known)) or 'none'})")
    if action == "forward" and to_entry is None:
        problems.add(node.line, f"{label}: action forward needs 'to'")
    if action in ("drop", "quarantine") and to_entry is not None:
        problems.add(to_entry[0].line, f"{label}: action {action} takes no 'to'")
    when = _choice(fields, "when", ("instance", "complete"), "instance", label, problems)
    then = _choice(fields, "then", ("stop", "continue"), "stop", label, problems)
    completion = None
    comp = fields.get("completion")
    if comp is not None:
        try:
            completion = CompletionConfig.model_validate(_plain(comp[1]))
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                line = comp[1].line
                if isinstance(comp[1].value, dict) and err["loc"] and str(err["loc"][0]) in comp[1].value:
                    line = comp[1].value[str(err["loc"][0])][0].line
                problems.add(line, f"{label}: completion.{loc}: {err['msg']}")
    if len(problems.items) > before:
        return None
    return Rule(name, node.line, tuple(conditions), action, to, when, then == "stop", completion)


def _choice(fields: dict, key: str, allowed: tuple[str, ...], default: str, label: str, problems: _Problems) -> str:
    entry = fields.get(key)
    if entry is None:
        return default
    value = entry[1].value
    if value not in allowed:
        problems.add(entry[1].line, f"{label}: {key} must be one of {', '.join(allowed)}, not {value!r}")
        return default
    return value


def _parse_condition(label: str, key: str, knode: _Node, cnode: _Node, problems: _Problems) -> list[Condition]:
    if key not in TAG_FIELDS and key not in ASSOCIATION_FIELDS:
        problems.add(knode.line, f"{label}: cannot match on {key!r}: known are "
                                 f"{', '.join([*TAG_FIELDS, *ASSOCIATION_FIELDS])}")
        return []
    if not isinstance(cnode.value, dict):
        value = _plain(cnode)
        if isinstance(value, list):
            problems.add(cnode.line, f"{label}: {key}: a list needs an operator ({{in: [...]}})")
            return []
        if value is None:
            problems.add(cnode.line, f"{label}: {key}: empty condition (use {{present: false}})")
            return []
        return [Condition(key, "eq", value)]
    out = []
    for op, (onode, vnode) in cnode.value.items():
        value = _plain(vnode)
        where = f"{label}: {key}.{op}"
        if op not in OPERATORS:
            problems.add(onode.line, f"{label}: {key}: unknown operator {op!r} (known: {', '.join(OPERATORS)})")
        elif op in ("gt", "ge", "lt", "le"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.add(vnode.line, f"{where}: needs a number, not {value!r}")
            else:
                out.append(Condition(key, op, float(value)))
        elif op == "regex":
            if not isinstance(value, str):
                problems.add(vnode.line, f"{where}: needs a string pattern")
                continue
            try:
                out.append(Condition(key, op, re.compile(value)))
            except re.error as exc:
                problems.add(vnode.line, f"{where}: invalid regular expression: {exc}")
        elif op in ("in", "not_in"):
            if not isinstance(value, list) or not value or any(isinstance(x, (list, dict)) for x in value):
                problems.add(vnode.line, f"{where}: needs a non-empty list of values")
            else:
                out.append(Condition(key, op, tuple(value)))
        elif op == "present":
            if not isinstance(value, bool):
                problems.add(vnode.line, f"{where}: needs true or false")
            else:
                out.append(Condition(key, op, value))
        else:
            if value is None or isinstance(value, (list, dict)):
                problems.add(vnode.line, f"{where}: needs a single value")
            else:
                out.append(Condition(key, op, value))
    if not cnode.value:
        problems.add(cnode.line, f"{label}: {key}: empty condition")
    return out
