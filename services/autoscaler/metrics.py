"""Prometheus metrics of the autoscaler: the lag it reads (also the input of a KEDA ScaledObject) and its decisions."""

from prometheus_client import Counter, Gauge

from .decision import Decision, Observation

lag = Gauge("dicomflow_autoscaler_lag", "Consumer-group lag: pending + unacknowledged events over all partitions", ["group"])
partition_lag = Gauge("dicomflow_autoscaler_partition_lag", "Lag of one partition consumer", ["group", "partition"])
backlog_partitions = Gauge("dicomflow_autoscaler_backlog_partitions", "Partitions with lag > 0 (most workers that can be busy)", ["group"])
inflight_partitions = Gauge("dicomflow_autoscaler_inflight_partitions", "Partitions with unacknowledged deliveries (studies in flight)", ["group"])
# For KEDA's Prometheus scaler with threshold = target_lag: the lag capped at backlog_partitions x target_lag,
# so an AverageValue HPA on it never asks for more replicas than partitions with backlog (study affinity).
affinity_lag = Gauge("dicomflow_autoscaler_affinity_lag", "Lag capped at backlog_partitions x target_lag (scale on this with KEDA)", ["group"])
target_lag = Gauge("dicomflow_autoscaler_target_lag", "AverageValue target: lag per replica", ["group"])
current_replicas = Gauge("dicomflow_autoscaler_current_replicas", "Replicas before the decision", ["group"])
metric_replicas = Gauge("dicomflow_autoscaler_metric_replicas", "Replicas the lag alone asks for (HPA step)", ["group"])
proposal_replicas = Gauge("dicomflow_autoscaler_proposal_replicas", "Replicas after the study-affinity clamps", ["group"])
desired_replicas = Gauge("dicomflow_autoscaler_desired_replicas", "Replicas decided (after stabilization and rate limits)", ["group"])
decisions = Counter("dicomflow_autoscaler_decisions_total", "Decisions, by direction, HPA reason and affinity clamp",
                    ["group", "direction", "reason", "clamp"])
scalings = Counter("dicomflow_autoscaler_scale_events_total", "Changes applied to the workload, by direction", ["group", "direction"])
errors = Counter("dicomflow_autoscaler_errors_total", "Failed lag reads or actuations", ["group", "stage"])


def export_lag(group: str, obs: Observation, target: int) -> None:
    """Publish one group's lag figures."""
    lag.labels(group).set(obs.lag)
    for p in obs.partitions:
        partition_lag.labels(group, str(p.partition)).set(p.lag)
    backlog_partitions.labels(group).set(obs.backlog_partitions)
    inflight_partitions.labels(group).set(obs.inflight_partitions)
    affinity_lag.labels(group).set(min(obs.lag, obs.backlog_partitions * target))
    target_lag.labels(group).set(target)


def export_decision(d: Decision) -> None:
    """Publish one decision's inputs, steps and result."""
    current_replicas.labels(d.group).set(d.current)
    metric_replicas.labels(d.group).set(d.metric_proposal)
    proposal_replicas.labels(d.group).set(d.proposal)
    desired_replicas.labels(d.group).set(d.desired)
    decisions.labels(d.group, d.direction, d.reason, d.clamp.split(":")[0]).inc()
