"""Prometheus metrics of deletions."""

from prometheus_client import Counter, Histogram

from shared.telemetry import LATENCY_BUCKETS

instances = Counter("dicomflow_deleted_instances_total", "Instances deleted, by reason (request, rejection-note, "
                    "retention)", ["reason"])
objects = Counter("dicomflow_deleted_objects_total", "Objects removed from a backend by deletions (bytes no other "
                  "instance holds), by backend and result (removed, failed; raced: removed while the same bytes were being "
                  "stored again)", ["backend", "result"])
seconds = Histogram("dicomflow_delete_seconds", "One deletion (a study, series or instance): catalogue, objects, "
                    "study index tombstones", buckets=LATENCY_BUCKETS)
