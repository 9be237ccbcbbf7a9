"""The scaling decision against hand-computed Kubernetes HPA cases, then the study-affinity clamps.

Policy unless a row says otherwise: target_lag 100, tolerance 0.1, replicas 1..8, 8 partitions, the HPA
default behaviors (up: no window, +4 pods or +100% per 15 s, the larger; down: 300 s window, -100% per 15 s).
"""

from __future__ import annotations

import pytest

from services.autoscaler.decision import History, Observation, PartitionLag, decide, metric_replicas
from shared.config import AutoscaleGroupConfig

NOW = 10_000.0


def policy(**over) -> AutoscaleGroupConfig:
    return AutoscaleGroupConfig.model_validate({"target_lag": 100, "min_replicas": 1, "max_replicas": 8, **over})


def spread(lag: int, parts: int = 8, ack: int = 0, count: int = 8, inst: str = "") -> Observation:
    """``lag`` events spread over the first ``parts`` of ``count`` partitions (``ack`` of each unacknowledged)."""
    rows = []
    for p in range(count):
        share = lag // parts + (1 if p < lag % parts else 0) if p < parts else 0
        a = min(ack, share)
        rows.append(PartitionLag(p, share - a, a, (inst,) if inst and share else ()))
    return Observation(tuple(rows), count)


def recs(*pairs) -> History:
    """History with recommendations given as (seconds ago, replicas)."""
    return History(recommendations=tuple((NOW - ago, r) for ago, r in pairs))


def ups(*pairs) -> History:
    return History(scale_up_events=tuple((NOW - ago, d) for ago, d in pairs))


DOWN_NOW = {"stabilization_s": 0, "policies": [{"type": "percent", "value": 100, "period_s": 15}]}

# (case, policy overrides, observation, current, history, desired, reason, clamp)
CASES = [
    # --- the metric (GetExternalPerPodMetricReplicas) ---
    ("ratio 1.05 is within tolerance: keep 4", {}, spread(420), 4, History(), 4, "DesiredWithinRange", ""),
    ("ratio 0.95 is within tolerance: keep 4", {"scale_down": DOWN_NOW}, spread(380), 4, History(), 4,
     "DesiredWithinRange", ""),
    ("ratio 1.125 leaves tolerance: ceil(450/100) = 5", {}, spread(450), 4, History(), 5, "DesiredWithinRange", ""),
    ("ratio 1.09 is within tolerance: keep", {}, spread(436), 4, History(), 4, "DesiredWithinRange", ""),
    # 440/400 is 1.1000000000000000888 in binary floating point, as in the HPA controller: it scales.
    ("ratio 1.1 is just past the tolerance", {}, spread(440), 4, History(), 5, "DesiredWithinRange", ""),
    # --- scale-up rate (calculateScaleUpLimitWithScalingRules) ---
    ("1 -> 8 wanted, max(1+4 pods, 1*200%) = 5", {}, spread(800), 1, History(), 5, "ScaleUpLimit", ""),
    ("select min: min(1+4, ceil(1*2)) = 2",
     {"scale_up": {"stabilization_s": 0, "select": "min", "policies": [{"type": "pods", "value": 4, "period_s": 15},
                                                                       {"type": "percent", "value": 100, "period_s": 15}]}},
     spread(800), 1, History(), 2, "ScaleUpLimit", ""),
    ("+4 already 10 s ago: period start 1, limit 5 = current", {}, spread(800), 5, ups((10, 4)), 5, "ScaleUpLimit", ""),
    ("+4 was 16 s ago: limit max(9, 10) > max 8", {}, spread(800), 5, ups((16, 4)), 8, "DesiredWithinRange", ""),
    ("percent 50: ceil(3 * 1.5) = 5",
     {"scale_up": {"stabilization_s": 0, "policies": [{"type": "percent", "value": 50, "period_s": 60}]}},
     spread(800), 3, History(), 5, "ScaleUpLimit", ""),
    ("scale-up disabled", {"scale_up": {"stabilization_s": 0, "select": "disabled",
                                        "policies": [{"type": "pods", "value": 4, "period_s": 15}]}},
     spread(800), 2, History(), 2, "ScaleUpLimit", ""),
    ("from zero: ceil(50/100) = 1", {"min_replicas": 0}, spread(50, parts=1), 0, History(), 1, "DesiredWithinRange", ""),
    # --- stabilization windows (stabilizeRecommendationWithBehaviors) ---
    ("scale-down window holds the 100 s old recommendation 4", {}, spread(100, parts=1), 4, recs((100, 4)), 4,
     "ScaleDownStabilized", ""),
    ("window passed (301 s): down to 1 at once", {}, spread(100, parts=1), 4, recs((301, 4)), 1,
     "DesiredWithinRange", ""),
    ("window keeps the highest recent recommendation, 3", {}, spread(100, parts=1), 4, recs((200, 3), (301, 4)), 3,
     "ScaleDownStabilized", ""),
    ("scale-up window 30 s: the lowest recent recommendation 2",
     {"scale_up": {"stabilization_s": 30, "policies": [{"type": "pods", "value": 4, "period_s": 15}]}},
     spread(600), 1, recs((10, 2)), 2, "ScaleUpStabilized", ""),
    # --- scale-down rate (calculateScaleDownLimitWithBehaviors) ---
    ("pods 1 per 60 s: 4 -> 3", {"scale_down": {"stabilization_s": 0, "policies": [{"type": "pods", "value": 1,
                                                                                    "period_s": 60}]}},
     spread(100, parts=1), 4, History(), 3, "ScaleDownLimit", ""),
    ("percent 50 truncates: int(5 * 0.5) = 2",
     {"scale_down": {"stabilization_s": 0, "policies": [{"type": "percent", "value": 50, "period_s": 60}]}},
     spread(100, parts=1), 5, History(), 2, "ScaleDownLimit", ""),
    ("scale-down disabled", {"scale_down": {"stabilization_s": 0, "select": "disabled",
                                            "policies": [{"type": "pods", "value": 1, "period_s": 60}]}},
     spread(0), 4, History(), 4, "ScaleDownLimit", ""),
    ("idle: down to min 1", {"scale_down": DOWN_NOW}, spread(0), 3, History(), 1, "TooFewReplicas", ""),
    # --- bounds ---
    ("max is the partition count (4) too", {}, spread(800, parts=4, count=4), 6, History(), 4, "TooManyReplicas", "BacklogPartitions"),
    ("below min 2: up to 2 at once", {"min_replicas": 2}, spread(0), 1, History(), 2, "TooFewReplicas", ""),
    ("metric 20 capped by max 8", {"max_replicas": 8}, spread(2000), 8, History(), 8, "DesiredWithinRange", "BacklogPartitions"),
    # --- study affinity ---
    ("one 2,000-instance study: one partition, one worker", {}, spread(2000, parts=1, ack=64), 1, History(), 1,
     "DesiredWithinRange", "BacklogPartitions"),
    ("700 events on 3 partitions: 3, not 7", {}, spread(700, parts=3), 1, History(), 3, "DesiredWithinRange",
     "BacklogPartitions"),
    ("3 studies in flight keep 3 of 4 workers", {"scale_down": DOWN_NOW}, spread(6, parts=3, ack=2), 4, History(), 3,
     "DesiredWithinRange", "InFlightStudies"),
    ("in-flight floor never raises above current", {}, spread(6, parts=3, ack=2), 1, History(), 1,
     "DesiredWithinRange", ""),
    ("institution floor 3 while HOSP_A has a study in flight", {"institution_floors": {"HOSP_A": 3}},
     spread(5, parts=1, inst="HOSP_A"), 1, History(), 3, "DesiredWithinRange", "InstitutionFloor:HOSP_A"),
    ("no floor for another institution", {"institution_floors": {"HOSP_A": 3}},
     spread(5, parts=1, inst="HOSP_B"), 1, History(), 1, "DesiredWithinRange", ""),
]


@pytest.mark.parametrize("case,over,obs,current,history,desired,reason,clamp", CASES, ids=[c[0] for c in CASES])
def test_decision_table(case, over, obs, current, history, desired, reason, clamp):
    d, _ = decide("store", policy(**over), obs, current, NOW, history)
    assert (d.desired, d.reason, d.clamp) == (desired, reason, clamp), d.explain()
    assert str(d.desired) in d.explain() and d.as_dict()["direction"] == d.direction


def test_metric_is_hpa_average_value():
    assert metric_replicas(450, 100, 4, 0.1) == (5, False)
    assert metric_replicas(401, 100, 4, 0.1) == (4, True)
    assert metric_replicas(0, 100, 4, 0.1) == (0, False)
    assert metric_replicas(1, 100, 0, 0.1) == (1, False)


def test_history_keeps_recommendations_and_scale_events():
    p = policy()
    d, h = decide("store", p, spread(800), 1, NOW, History())
    assert h.recommendations == ((NOW, 8),)
    h = h.with_scale(NOW, 1, d.desired)
    assert h.scale_up_events == ((NOW, 4),)
    # 5 s later the +4 still counts: period start 1 again, so no further growth.
    d2, h = decide("store", p, spread(800), 5, NOW + 5, h)
    assert d2.desired == 5 and d2.reason == "ScaleUpLimit"
    # Old recommendations fall out of both windows and are forgotten.
    _, h = decide("store", p, spread(800), 5, NOW + 1000, h)
    assert h.recommendations == ((NOW + 1000, 8),)


def test_no_flapping_when_backlog_moves_between_partitions():
    """A steady load whose backlog hops between 1 and 3 partitions: one scale-up, no scale-down inside the window."""
    p = policy(target_lag=10, max_replicas=4,
               scale_down={"stabilization_s": 5, "policies": [{"type": "percent", "value": 100, "period_s": 15}]})
    history, current, changes = History(), 1, []
    for tick in range(40):  # 0.5 s apart: 20 s of steady load
        obs = spread(40, parts=3 if tick % 3 else 1)
        now = NOW + tick * 0.5
        d, history = decide("store", p, obs, current, now, history)
        if d.desired != current:
            changes.append((tick, current, d.desired))
            history = history.with_scale(now, current, d.desired)
            current = d.desired
    assert changes == [(1, 1, 3)], changes
