"""The router's handling of one instance event, and of a study's completion.

Instance: rules -> streaming forwards (a job per instance and destination on the destination's
queue; a group's destination is the study's sticky member) -> study state (KV, compare-and-set).
Completion: on-complete forwards (the study's events read back from the stream) -> one
``study.complete`` / ``study.updated`` per generation (Nats-Msg-Id = study UID + generation) ->
the generation marked done. Publishing before marking makes a crash in between harmless: the next
member publishes again and JetStream drops the duplicate.

Every step is idempotent: JetStream redelivers after a crash, out of order. Every receipt of an
instance is an event of its own: one that brings the bytes the study already holds for that instance
(a resend, whenever it comes) is recognised before anything is queued (the study's recent memory, then
the instance's earlier events in the stream) and forwards nothing, nor re-opens a completed study; a
new version is forwarded and re-opens it. Study walks forward each instance's last version once.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from nats.aio.client import Client as NATS
from opentelemetry import trace

from shared.bus.connection import publish_event
from shared.bus.delivery import Delivery
from shared.config import Config
from shared.contract import subjects
from shared.contract.events import (
    DeadLetter,
    ForwardJob,
    InstanceReceived,
    SeriesSummary,
    StudyComplete,
    StudyRouted,
    utcnow,
)

from . import metrics
from .completion import (
    Decision,
    StudyState,
    Summary,
    due,
    latest_versions,
    mark_completed,
    recent_verdict,
    summarize,
    verdict_from_history,
)
from .decisions import (
    Keep,
    Move,
    Routed,
    forwarding,
    newly_routed,
    plan_instance,
    record_instance,
    resolve_assignment,
)
from .history import earlier_digests, study_events
from .rules import Rule, RuleSet, facts_of
from .state import Assignments, Health, StudyBook

log = logging.getLogger("dicomflow.router")
tracer = trace.get_tracer("dicomflow.router")


def job_for(event: InstanceReceived, target: str, group: str, rule: str, seq: int = 0) -> ForwardJob:
    """The forward job of one instance (its event at stream sequence ``seq``) to one target."""
    t = event.tags
    return ForwardJob(target=target, group=group, rule=rule, study_uid=t.study_uid, series_uid=t.series_uid,
                      sop_uid=t.sop_uid, sop_class_uid=t.sop_class_uid, transfer_syntax_uid=event.transfer_syntax_uid,
                      digest=event.digest, size=event.size, backend=event.backend, source_seq=seq)


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class Router:
    """Routes instance events (the consumer-group handler) and completes studies (the scanner)."""

    def __init__(self, config: Config, rules: RuleSet, nc: NATS, book: StudyBook, assignments: Assignments,
                 health: Health):
        self.config = config
        self.rules = rules
        self.nc = nc
        self.js = nc.jetstream()
        self.book = book
        self.assignments = assignments
        self.health = health

    @property
    def timeout(self) -> float:
        return self.config.nats.publish_timeout_s

    def reconfigure(self, config: Config, rules: RuleSet) -> None:
        """New targets, groups and rules (a reload); in-flight studies keep their assignments."""
        self.config = config
        self.rules = rules

    # --- instances --------------------------------------------------------------------------------------------

    async def handle_batch(self, deliveries: list[Delivery[InstanceReceived]]) -> list[BaseException | None]:
        """Handle one pull's instance events, in partition order, one at a time (the study's state is
        read and changed per instance); one outcome per delivery (None: acknowledge).

        The consumer decoded them (parking poison ones) and started their ``router.instance`` spans,
        which continue the ingest's trace; each is current while its instance is handled, so the
        forward jobs it publishes carry it on.
        """
        outcomes: list[BaseException | None] = []
        for d in deliveries:
            with trace.use_span(d.span, end_on_exit=False):
                try:
                    await self.handle(d.event, d.stream_seq, d.span)
                    outcomes.append(None)
                except Exception as exc:
                    outcomes.append(exc)
        return outcomes

    async def handle(self, event: InstanceReceived, seq: int, span: trace.Span) -> None:
        """Route one instance: rules, forwards, quarantines, then the study's state (compare-and-set)."""
        t = event.tags
        span.set_attribute("dicom.study_uid", t.study_uid)
        span.set_attribute("dicom.sop_uid", t.sop_uid)
        matched = self.rules.evaluate(facts_of(t, event.calling_ae, event.called_ae))
        span.set_attribute("router.rules", ",".join(r.name for r in matched))
        for rule in matched:
            metrics.actions.labels(rule.name, rule.action).inc()
        recent = self.config.router.recent_instances
        state, rev = await self.book.get(t.study_uid)
        verdict = await self.verdict(event, seq, state, recent)
        span.set_attribute("router.verdict", verdict)
        if verdict == "duplicate":  # a resend of the version held: nothing to forward, nothing re-opens
            metrics.instances.labels("duplicate").inc()
            return
        plan = plan_instance(matched, event, seq, self.config.router.completion, replaces=verdict == "replaces")
        routed = []
        for fwd in plan.forwards:
            target, group = await self.enqueue(fwd.dest, fwd.rule, event, seq)
            routed.append(Routed(target, group, fwd.rule))
        for rule_name in plan.quarantines:
            await self.quarantine(rule_name, event)
        now = time.time()
        before, after = await self.book.update(t.study_uid,
                                               lambda st: record_instance(st, plan, now, routed, recent)[0],
                                               read=(state, rev))
        metrics.instances.labels("new" if after is not None else "duplicate").inc()
        for target, group, rule_name in (newly_routed(before, routed) if after is not None else ()):
            await self.announce_routed(t.study_uid, target, group, rule_name)

    async def verdict(self, event: InstanceReceived, seq: int, state: StudyState | None, recent: int) -> str:
        """Whether the event brings a new instance ("new"), another version of one ("replaces"), or the bytes
        the study holds for it again ("duplicate"): the study's memory (``state``, of ``recent`` instances)
        first, the instance's earlier events in the stream where that cannot tell."""
        t = event.tags
        verdict, source = recent_verdict(state, t.sop_uid, event.digest, recent, event.tenant), "memory"
        if verdict == "unknown":
            digests = await earlier_digests(self.nc, self.config.stream.name, self.config.stream.partitions,
                                            t.study_uid, t.sop_uid, seq, event.tenant) if seq else []
            verdict, source = verdict_from_history(digests, event.digest), "stream"
        metrics.verdicts.labels(verdict, source).inc()
        return verdict

    async def enqueue(self, dest: str, rule: str, event: InstanceReceived, seq: int = 0) -> tuple[str, str]:
        """Put the instance on the queue of ``dest`` (a group resolves to the study's member); returns (target, group)."""
        group = dest if dest in self.config.router.groups else ""
        target = await self.assign(group, event.tags.study_uid) if group else dest
        job = job_for(event, target, group, rule, seq)
        await publish_event(self.js, job, self.timeout)
        return target, group

    async def assign(self, group: str, study_uid: str) -> str:
        """The study's member of ``group``: the recorded one, or a new sticky choice among healthy members."""
        current, _ = await self.assignments.get(group, study_uid)
        gcfg = self.config.router.groups[group]
        members = gcfg.members
        healthy = [t for t in members if await self.health.is_up(t)]
        decision = resolve_assignment(study_uid, current or None, members, healthy, loads=self.open_loads(members),
                                      bound=gcfg.load_bound)
        assert decision is not None  # a group has at least one member (validated), and nothing is excluded
        if isinstance(decision, Keep):
            return decision.target
        if isinstance(decision, Move):
            # Its member left the group (a reload): the whole study moves, never half of it.
            target, _ = await self._move(group, study_uid, decision, "")
            return target
        target, mine = await self.assignments.claim(group, study_uid, decision.target)
        if mine:
            metrics.assignments.labels(group, target).inc()
            log.info("study %s -> %s (group %s)", study_uid, target, group)
        return target

    async def member_of(self, group: str, study_uid: str) -> str | None:
        """The study's recorded member of ``group`` (None when it has none yet)."""
        return (await self.assignments.get(group, study_uid))[0]

    async def reassign(self, group: str, study_uid: str, down: str, rule: str) -> bool:
        """Move the whole study off ``down`` (its member) to a healthy member; False when it stays on ``down``."""
        gcfg = self.config.router.groups[group]
        members = gcfg.members
        healthy = [t for t in members if t != down and await self.health.is_up(t)]
        decision = resolve_assignment(study_uid, down, members, healthy, loads=self.open_loads(members),
                                      bound=gcfg.load_bound, exclude=[down])
        if not isinstance(decision, Move):
            return False
        target, moved = await self._move(group, study_uid, decision, rule)
        if moved:
            metrics.reassignments.labels(group).inc()
        return target != down

    async def _move(self, group: str, study_uid: str, move: Move, rule: str) -> tuple[str, bool]:
        """Carry a move out: record it (compare-and-set), then queue the study again and announce it there.

        Returns (the study's member now, whether this call moved it): another router member may have
        moved it first, and then that member resends it.
        """
        target, moved = await self.assignments.move(group, study_uid, move.source, move.target)
        if moved:
            n = await self.resend_study(study_uid, group, target)
            log.warning("study %s moved whole from %s to %s in group %s (%d instances queued)", study_uid,
                        move.source, target, group, n)
            await self.announce_routed(study_uid, target, group, rule, moved_from=move.source)
        return target, moved

    async def set_health(self, target: str, up: bool) -> None:
        """Record whether ``target`` accepts associations (shared with the other members)."""
        await self.health.set(target, up)

    def open_loads(self, members) -> dict[str, int]:
        """Open studies per member (from this member's mirror of the study states): the load to bound."""
        loads = dict.fromkeys(members, 0)
        for st in list(self.book.mirror.values()):
            if st.is_open:
                for t in st.targets:
                    if t in loads:
                        loads[t] += 1
        return loads

    async def announce_routed(self, study_uid: str, target: str, group: str, rule: str, moved_from: str = "") -> None:
        ev = StudyRouted(study_uid=study_uid, target=target, group=group, rule=rule, reassigned_from=moved_from,
                         routed_at=utcnow())
        await publish_event(self.js, ev, self.timeout)

    async def quarantine(self, rule: str, event: InstanceReceived) -> None:
        """Hold the instance in the dead-letter stream (pseudo-target ``_quarantine``) for an operator."""
        job = job_for(event, subjects.QUARANTINE, "", rule)
        dl = DeadLetter(job=job, reason=f"quarantined by rule {rule!r}", attempts=0, failed_at=utcnow())
        await publish_event(self.js, dl, self.timeout)

    # --- whole studies ---------------------------------------------------------------------------------------

    async def resend_study(self, study_uid: str, group: str, target: str, after_seq: int = 0) -> int:
        """Queue every instance of the study that a streaming rule sends to ``group`` again, to ``target``."""
        n = 0
        for seq, event in await self._latest_events(study_uid, after_seq):
            for rule in self._forwarding(event, "instance"):
                if group in rule.to:
                    job = job_for(event, target, group, rule.name, seq)
                    await publish_event(self.js, job, self.timeout)
                    n += 1
        return n

    async def _latest_events(self, study_uid: str, after_seq: int = 0) -> list[tuple[int, InstanceReceived]]:
        """(seq, event) of the last version of each instance of the study whose event is after ``after_seq``
        (the walk starts at the beginning: a resend after ``after_seq`` of a version before it is no version)."""
        events = [(seq, e.tags.sop_uid, e.digest, e) async for seq, e in study_events(
            self.nc, self.config.stream.name, self.config.stream.partitions, study_uid)]
        return [(seq, e) for seq, e in latest_versions(events) if seq > after_seq]

    def _forwarding(self, event: InstanceReceived, when: str) -> list[Rule]:
        return forwarding(self.rules.evaluate(facts_of(event.tags, event.calling_ae, event.called_ae)), when)

    async def scan(self) -> int:
        """Complete every study that is due (any member may; the KV and Nats-Msg-Id keep it once)."""
        now = time.time()
        default = self.config.router.completion
        due_now = [st for st in list(self.book.mirror.values()) if due(st, now, default)]
        metrics.open_studies.set(sum(1 for st in self.book.mirror.values() if st.is_open))
        done = 0
        for st in due_now:
            try:
                done += await self.complete(st.study_uid)
            except Exception:
                log.exception("completing study %s failed; retrying at the next scan", st.study_uid)
        return done

    async def complete(self, study_uid: str) -> int:
        """Complete one study if it is still due (re-checked on the stored state); returns 1 when announced."""
        st, _ = await self.book.get(study_uid)
        if st is None:
            return 0
        decision = due(st, time.time(), self.config.router.completion)
        if decision is None:
            return 0
        with tracer.start_as_current_span("router.complete") as span:
            span.set_attribute("dicom.study_uid", study_uid)
            span.set_attribute("router.generation", st.gen)
            summary = await self._recount_and_forward(st, forward=st.on_complete and not decision.discard)
            event = self._complete_event(st, decision, summary)
            kind = event.kind
            ack = await publish_event(self.js, event, self.timeout)
            gen, seq = st.gen, max(st.max_seq, summary.last_seq)
            await self.book.update(study_uid, lambda s: mark_completed(s, gen, seq, summary.instances) if s else None)
            if not ack.duplicate:
                metrics.studies_completed.labels(kind, decision.reason).inc()
                log.info("study %s %s (generation %d, %d instances, %s)", study_uid, kind, gen, summary.instances,
                         decision.reason)
            return 0 if ack.duplicate else 1

    async def _recount_and_forward(self, st: StudyState, forward: bool) -> Summary:
        """Recount the study from its instance events; queue the on-complete forwards of those not yet covered."""
        items = []
        n = 0
        routed: dict[str, tuple[str, str]] = {}
        for seq, event in await self._latest_events(st.study_uid):
            t = event.tags
            items.append((seq, t.series_uid, t.sop_uid, event.digest, t.series_description, t.modality))
            if not forward or seq <= st.seq_at_complete:
                continue
            for rule in self._forwarding(event, "complete"):
                for dest in rule.to:
                    target, group = await self.enqueue(dest, rule.name, event, seq)
                    routed.setdefault(target, (group, rule.name))
                    n += 1
        for target, (group, rule) in routed.items():
            if target not in st.targets:  # announced once; the same Nats-Msg-Id absorbs a repeat
                await self.announce_routed(st.study_uid, target, group, rule)
        if forward:
            log.info("study %s: %d on-complete forwards queued", st.study_uid, n)
        return summarize(items)

    def _complete_event(self, st: StudyState, decision: Decision, summary: Summary) -> StudyComplete:
        series = [SeriesSummary(series_uid=uid, instances=x.n, description=x.description, modality=x.modality)
                  for uid, x in summary.series.items()]
        return StudyComplete(study_uid=st.study_uid, generation=st.gen, reason=decision.reason,
                             incomplete=decision.incomplete, discarded=decision.discard, instances=summary.instances,
                             series=series, patient_id=st.patient_id, accession_number=st.accession_number,
                             calling_ae=st.calling_ae, institution_name=st.institution_name, tenant=st.tenant,
                             first_arrival=_ts(st.first_arrival), last_arrival=_ts(st.last_arrival),
                             completed_at=utcnow())
