"""Prometheus metrics of the store."""

from prometheus_client import Counter, Histogram

from shared.telemetry import LATENCY_BUCKETS

instances = Counter("dicomflow_store_instances_total", "Instance events handled, by outcome (new/replaced/same/resent/stale/rejected)", ["outcome"])
bytes_written = Counter("dicomflow_store_bytes_total", "Bytes written to placements, by backend", ["backend"])
streamed = Counter("dicomflow_store_streamed_total", "Instances copied to a placement chunk by chunk (above store.stream_above_bytes), by backend", ["backend"])
failures = Counter("dicomflow_store_failures_total", "Failed attempts (retried by redelivery), by stage", ["stage"])
place_seconds = Histogram("dicomflow_store_place_seconds", "Writing an instance to all placements of its policy", buckets=LATENCY_BUCKETS)
index_seconds = Histogram("dicomflow_store_index_seconds", "Recording an instance in the index", buckets=LATENCY_BUCKETS)
