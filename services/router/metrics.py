"""Prometheus metrics of the router."""

from prometheus_client import Counter, Gauge, Histogram

from shared.telemetry import LATENCY_BUCKETS

instances = Counter("dicomflow_router_instances_total", "Instance events handled, by outcome (new/duplicate)", ["outcome"])
verdicts = Counter("dicomflow_router_verdicts_total", "What an instance event brings (new/replaces/duplicate), by where it was told (memory: the study state; stream: the instance's earlier events)", ["verdict", "source"])
actions = Counter("dicomflow_router_actions_total", "Rule actions taken, by rule and action", ["rule", "action"])
forwarded = Counter("dicomflow_router_forwarded_total", "Instances sent, by target", ["target"])
forwarded_bytes = Counter("dicomflow_router_forwarded_bytes_total", "Bytes sent, by target", ["target"])
forward_failures = Counter("dicomflow_router_forward_failures_total", "Failed send attempts (instances), by target", ["target"])
dead_letters = Counter("dicomflow_router_dead_letters_total", "Instances moved to the dead-letter stream, by target", ["target"])
corrupt_objects = Counter("dicomflow_router_corrupt_objects_total", "Copies of an instance that did not match their digest when read to be sent (never sent; another copy is tried), by target", ["target"])
unread = Counter("dicomflow_router_unread_instances_total", "Forward jobs none of whose copies could be read and verified, by target and problem (missing, corrupt: dead-lettered; unreadable: retried)", ["target", "problem"])
send_seconds = Histogram("dicomflow_router_send_seconds", "One batch sent to a target", ["target"], buckets=LATENCY_BUCKETS)
target_up = Gauge("dicomflow_router_target_up", "1 when the target accepts connections (as this member sees it)", ["target"])
studies_completed = Counter("dicomflow_router_studies_completed_total", "Study completions announced, by kind (complete/updated) and reason", ["kind", "reason"])
open_studies = Gauge("dicomflow_router_open_studies", "Studies waiting for completion (this member's mirror)")
assignments = Counter("dicomflow_router_assignments_total", "New study assignments, by group and target", ["group", "target"])
reassignments = Counter("dicomflow_router_reassignments_total", "Whole studies moved off a down target, by group", ["group"])
