"""Prometheus metrics of the read side of DICOMweb (QIDO-RS, WADO-RS)."""

from prometheus_client import Counter

results = Counter("dicomflow_web_query_results_total", "Objects returned by QIDO-RS queries, by level", ["level"])
retrieved_bytes = Counter("dicomflow_web_retrieved_bytes_total", "Data set bytes streamed by WADO-RS retrieves")
corrupt = Counter("dicomflow_web_corrupt_objects_total",
                  "Objects whose bytes did not match their digest while a retrieve read them (the request failed)")
changefeed_entries = Counter("dicomflow_changefeed_entries_total", "Change feed entries returned by GET /changefeed")
changefeed_failures = Counter("dicomflow_changefeed_unavailable_total",
                              "Change feed requests answered 503 because NATS could not be reached")
