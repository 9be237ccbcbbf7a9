"""Prometheus metrics of the DICOMweb HTTP service."""

from prometheus_client import Counter, Histogram

from shared.telemetry import LATENCY_BUCKETS

requests = Counter("dicomflow_web_requests_total", "HTTP requests, by route template, method and status",
                   ["route", "method", "status"])
request_seconds = Histogram("dicomflow_web_request_seconds", "Time to answer an HTTP request, by route template",
                            ["route"], buckets=LATENCY_BUCKETS)
results = Counter("dicomflow_web_query_results_total", "Objects returned by QIDO-RS queries, by level", ["level"])
auth_failures = Counter("dicomflow_web_auth_failures_total", "Requests refused 401, by reason", ["reason"])
retrieved_bytes = Counter("dicomflow_web_retrieved_bytes_total", "Data set bytes streamed by WADO-RS retrieves")
corrupt = Counter("dicomflow_web_corrupt_objects_total",
                  "Objects whose bytes did not match their digest while a retrieve read them (the request failed)")
