"""Prometheus metrics of the ingest."""

from prometheus_client import Counter, Gauge, Histogram

from shared.telemetry import LATENCY_BUCKETS

instances = Counter("dicomflow_ingest_instances_total", "C-STORE requests answered, by DICOM status", ["status"])
bytes_received = Counter("dicomflow_ingest_bytes_total", "Bytes of instances accepted")
failures = Counter("dicomflow_ingest_failures_total", "Instances refused with 0xA700, by failing stage", ["stage"])
latency = Histogram("dicomflow_ingest_instance_seconds", "Time from data set received to status", buckets=LATENCY_BUCKETS)
staging_latency = Histogram("dicomflow_ingest_staging_seconds", "Durable write of the bytes (claim-check)", buckets=LATENCY_BUCKETS)
publish_latency = Histogram("dicomflow_ingest_publish_seconds", "JetStream publish until PubAck", buckets=LATENCY_BUCKETS)
tolerated = Counter("dicomflow_ingest_tolerated_total", "Instances accepted although their data set strays from the "
                    "standard in a way dcmtk's storescp tolerates, by kind (file_meta_in_data_set: the sender's file "
                    "meta opened the data set and was left out)", ["kind"])
associations = Gauge("dicomflow_ingest_associations", "Open associations")
rejected_associations = Counter("dicomflow_ingest_rejected_associations_total", "Associations rejected, by reason", ["reason"])
finds = Counter("dicomflow_ingest_finds_total", "C-FIND requests answered, by final DICOM status", ["status"])
retrieves = Counter("dicomflow_ingest_retrieves_total", "C-GET and C-MOVE requests answered, by kind and final DICOM "
                    "status", ["kind", "status"])
suboperations = Counter("dicomflow_ingest_retrieve_suboperations_total", "C-STORE sub-operations of C-GET and "
                        "C-MOVE, by outcome (completed, warning, failed)", ["outcome"])
retrieved_bytes = Counter("dicomflow_ingest_retrieved_bytes_total", "Data set bytes sent by C-GET and C-MOVE")
corrupt_objects = Counter("dicomflow_ingest_corrupt_objects_total", "Objects that did not match their digest while a "
                          "C-GET or C-MOVE sent them (the association carrying them was aborted)")
aborts = Counter("dicomflow_ingest_aborts_total", "Connections and associations the receiver ended for a protocol "
                 "violation (an A-ABORT, by its PS3.8 reason) or an expired ARTIM timer", ["reason"])
