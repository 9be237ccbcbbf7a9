"""Prometheus metrics of the staging releaser."""

from prometheus_client import Counter, Gauge, Histogram

from shared.telemetry import LATENCY_BUCKETS

staged_objects = Gauge("dicomflow_staging_objects", "Objects in the staging backend (claim-checks), at the last sweep")
staged_bytes = Gauge("dicomflow_staging_bytes", "Bytes in the staging backend, at the last sweep")
held = Gauge("dicomflow_staging_held_objects", "Staged objects kept at the last sweep, by reason", ["reason"])
released = Counter("dicomflow_staging_released_total", "Staged objects released (removed) because nothing needs them")
released_bytes = Counter("dicomflow_staging_released_bytes_total", "Bytes of the staged objects released")
sweeps = Counter("dicomflow_staging_sweeps_total", "Release sweeps, by outcome (done/incomplete/blocked/failed)",
                 ["outcome"])
sweep_seconds = Histogram("dicomflow_staging_sweep_seconds", "One release sweep", buckets=LATENCY_BUCKETS)
