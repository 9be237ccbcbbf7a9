"""How many replicas a consumer group should have: the Kubernetes HPA algorithm plus study affinity.

Pure: plain data in, a :class:`Decision` and the next :class:`History` out, no clock and no I/O.

The metric is an HPA ``AverageValue`` external metric: the group's lag (pending + unacknowledged
events over all partitions). The steps, in order, each recorded in the decision:

1. **metric**: ``ceil(lag / target_lag)``, or the current count while ``lag / (target x current)``
   is within ``1 +- tolerance`` (``GetExternalPerPodMetricReplicas``).
2. **study affinity**: a partition is consumed by one worker at a time and holds whole studies, so
   more workers than partitions with backlog would idle (a 2,000-slice CT on one partition cannot
   use two workers): the proposal is capped at the number of partitions with backlog. It is never
   below what in-flight studies need: the partitions with deliveries in flight (a worker in the
   middle of a study keeps its capacity) and the floors of institutions with a study in flight.
   These clamps act on the recommendation *before* the stabilization window, so that an emptied
   backlog does not bypass the scale-down window and a backlog that moves between partitions does
   not make the group flap.
3. **stabilization** (``stabilizeRecommendationWithBehaviors``): scale up only to the lowest
   recommendation of the scale-up window, down only to the highest of the scale-down window.
4. **rate limits and bounds** (``convertDesiredReplicasWithBehaviorRate``): the change allowed by
   the scaling policies within their periods (``select`` max/min/disabled), then min/max, where max
   is also never above the partition count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from shared.config import AutoscaleGroupConfig, ScalingRulesConfig


@dataclass(frozen=True)
class PartitionLag:
    """One partition consumer of a group, as JetStream reports it."""

    partition: int
    pending: int
    ack_pending: int
    institutions: tuple[str, ...] = ()  # calling AE / InstitutionName of the study at the head of its backlog

    @property
    def lag(self) -> int:
        """Events not yet acknowledged: pending plus delivered-but-unacknowledged."""
        return self.pending + self.ack_pending


@dataclass(frozen=True)
class Observation:
    """A consumer group's lag at one moment."""

    partitions: tuple[PartitionLag, ...]
    partition_count: int

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def backlog_partitions(self) -> int:
        """Partitions with anything left to do: the most workers that can be busy at once."""
        return sum(1 for p in self.partitions if p.lag > 0)

    @property
    def inflight_partitions(self) -> int:
        """Partitions with deliveries not yet acknowledged: a study is being worked on there."""
        return sum(1 for p in self.partitions if p.ack_pending > 0)

    def institutions_in_flight(self) -> set[str]:
        return {i for p in self.partitions if p.lag > 0 for i in p.institutions if i}


@dataclass(frozen=True)
class History:
    """What the HPA controller remembers between decisions: recommendations and scale events, timestamped."""

    recommendations: tuple[tuple[float, int], ...] = ()
    scale_up_events: tuple[tuple[float, int], ...] = ()
    scale_down_events: tuple[tuple[float, int], ...] = ()

    def with_scale(self, now: float, old: int, new: int, keep_s: float = 3600) -> History:
        """The history after the group was actually rescaled from ``old`` to ``new`` at ``now``."""
        ups = tuple(e for e in self.scale_up_events if e[0] > now - keep_s)
        downs = tuple(e for e in self.scale_down_events if e[0] > now - keep_s)
        if new > old:
            ups += ((now, new - old),)
        elif new < old:
            downs += ((now, old - new),)
        return History(self.recommendations, ups, downs)


@dataclass(frozen=True)
class Decision:
    """One explained decision: every input, every intermediate proposal, the result and why."""

    group: str
    at: float
    current: int
    lag: int
    target_lag: int
    partitions: int
    backlog_partitions: int
    inflight_partitions: int
    metric_proposal: int  # step 1
    within_tolerance: bool
    affinity_ceiling: int
    affinity_floor: int
    clamp: str  # step 2: "" or BacklogPartitions / InFlightStudies / InstitutionFloor:<name>
    proposal: int
    stabilized: int  # step 3
    desired: int  # step 4: the result
    reason: str  # HPA condition reason of step 3/4 (DesiredWithinRange, ScaleUpLimit, ScaleDownStabilized, ...)
    institutions_in_flight: tuple[str, ...] = field(default=())

    @property
    def direction(self) -> str:
        return "up" if self.desired > self.current else "down" if self.desired < self.current else "none"

    def explain(self) -> str:
        """One log line with the inputs, each step, and the result."""
        metric = "within tolerance, keep" if self.within_tolerance else f"ceil({self.lag}/{self.target_lag})"
        clamp = f" -> {self.clamp} {self.proposal}" if self.clamp else ""
        return (f"{self.group}: lag {self.lag} on {self.backlog_partitions}/{self.partitions} partitions "
                f"({self.inflight_partitions} in flight), {self.current} replicas; metric {metric} = "
                f"{self.metric_proposal}{clamp} [affinity {self.affinity_floor}..{self.affinity_ceiling}]; "
                f"stabilized {self.stabilized}; desired {self.desired} ({self.reason}) -> {self.direction}")

    def as_dict(self) -> dict:
        return {**asdict(self), "direction": self.direction}


def metric_replicas(lag: int, target: int, current: int, tolerance: float) -> tuple[int, bool]:
    """HPA for an AverageValue external metric: (replicas, whether the change was within tolerance)."""
    if current <= 0:
        return math.ceil(lag / target), False
    ratio = lag / (target * current)
    if abs(1.0 - ratio) <= tolerance:
        return current, True
    return math.ceil(lag / target), False


def _change_in_period(events: tuple[tuple[float, int], ...], now: float, period: float) -> int:
    return sum(delta for t, delta in events if t > now - period)


def _period_start(current: int, history: History, now: float, period: float) -> int:
    """Replicas at the start of a policy's period: the current count less the changes made within it."""
    return (current - _change_in_period(history.scale_up_events, now, period)
            + _change_in_period(history.scale_down_events, now, period))


def scale_up_limit(current: int, history: History, rules: ScalingRulesConfig, now: float) -> int:
    """The most replicas the scale-up policies allow now (``calculateScaleUpLimitWithScalingRules``)."""
    if rules.select == "disabled":
        return current
    limits = []
    for pol in rules.policies:
        start = _period_start(current, history, now, pol.period_s)
        limits.append(start + pol.value if pol.type == "pods" else math.ceil(start * (1 + pol.value / 100)))
    return (max if rules.select == "max" else min)(limits)


def scale_down_limit(current: int, history: History, rules: ScalingRulesConfig, now: float) -> int:
    """The fewest replicas the scale-down policies allow now (``calculateScaleDownLimitWithBehaviors``)."""
    if rules.select == "disabled":
        return current
    limits = []
    for pol in rules.policies:
        start = _period_start(current, history, now, pol.period_s)
        limits.append(start - pol.value if pol.type == "pods" else int(start * (1 - pol.value / 100)))
    # "max" selects the largest change, which for scaling down is the lowest limit.
    return (min if rules.select == "max" else max)(limits)


def affinity_bounds(policy: AutoscaleGroupConfig, obs: Observation, current: int) -> tuple[int, int, str]:
    """(floor, ceiling, the floor's reason) that study affinity puts on the recommendation."""
    ceiling = obs.backlog_partitions
    floor, why = min(current, obs.inflight_partitions), "InFlightStudies"
    for inst in sorted(obs.institutions_in_flight()):
        need = policy.institution_floors.get(inst, 0)
        if need > floor:
            floor, why = need, f"InstitutionFloor:{inst}"
    return floor, ceiling, why


def decide(group: str, policy: AutoscaleGroupConfig, obs: Observation, current: int, now: float,
           history: History) -> tuple[Decision, History]:
    """Decide the replicas of ``group`` at time ``now`` (seconds); returns the decision and the new history.

    The caller records an actual rescale with :meth:`History.with_scale` (not in dry-run mode: there,
    nothing changed, so no rate limit should count it).
    """
    max_r = min(policy.max_replicas, obs.partition_count)
    min_r = min(policy.min_replicas, max_r)
    lag = obs.lag
    metric, within = metric_replicas(lag, policy.target_lag, current, policy.tolerance)
    floor, ceiling, floor_why = affinity_bounds(policy, obs, current)
    proposal, clamp = metric, ""
    if proposal > ceiling:
        proposal, clamp = ceiling, "BacklogPartitions"
    if proposal < floor:
        proposal, clamp = floor, floor_why

    base = dict(group=group, at=now, current=current, lag=lag, target_lag=policy.target_lag,
                partitions=obs.partition_count, backlog_partitions=obs.backlog_partitions,
                inflight_partitions=obs.inflight_partitions, metric_proposal=metric, within_tolerance=within,
                affinity_ceiling=ceiling, affinity_floor=floor, clamp=clamp, proposal=proposal,
                institutions_in_flight=tuple(sorted(obs.institutions_in_flight())))
    # Outside the bounds the HPA corrects at once, without behaviors (and records nothing).
    if current > max_r:
        return Decision(**base, stabilized=max_r, desired=max_r, reason="TooManyReplicas"), history
    if current < min_r:
        return Decision(**base, stabilized=min_r, desired=min_r, reason="TooFewReplicas"), history

    up_cut = now - policy.scale_up.stabilization_s
    down_cut = now - policy.scale_down.stabilization_s
    up_rec = down_rec = proposal
    for t, rec in history.recommendations:
        if t > up_cut:
            up_rec = min(up_rec, rec)
        if t > down_cut:
            down_rec = max(down_rec, rec)
    stabilized = min(max(current, up_rec), down_rec)
    reason = ("ScaleUpStabilized" if stabilized < proposal else "ScaleDownStabilized" if stabilized > proposal
              else "")
    recs = tuple(r for r in history.recommendations if r[0] > min(up_cut, down_cut)) + ((now, proposal),)
    history = History(recs, history.scale_up_events, history.scale_down_events)

    desired = stabilized
    if stabilized > current:
        limit = max(scale_up_limit(current, history, policy.scale_up, now), current)
        allowed, why = (limit, "ScaleUpLimit") if limit < max_r else (max_r, "TooManyReplicas")
        if desired > allowed:
            desired, reason = allowed, why
    elif stabilized < current:
        limit = min(scale_down_limit(current, history, policy.scale_down, now), current)
        allowed, why = (limit, "ScaleDownLimit") if limit > min_r else (min_r, "TooFewReplicas")
        if desired < allowed:
            desired, reason = allowed, why
    return Decision(**base, stabilized=stabilized, desired=desired, reason=reason or "DesiredWithinRange"), history
