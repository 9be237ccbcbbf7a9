"""Prometheus metrics of the DICOMweb HTTP front (every resource mounted on it)."""

from prometheus_client import Counter, Histogram

from shared.telemetry import LATENCY_BUCKETS

requests = Counter("dicomflow_web_requests_total", "HTTP requests, by route template, method and status",
                   ["route", "method", "status"])
request_seconds = Histogram("dicomflow_web_request_seconds", "Time to answer an HTTP request, by route template",
                            ["route"], buckets=LATENCY_BUCKETS)
auth_failures = Counter("dicomflow_web_auth_failures_total", "Requests refused 401, by reason", ["reason"])
