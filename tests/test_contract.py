"""The published contract: every event model declares its channels, and the AsyncAPI document lists them all."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from datetime import UTC, datetime

from shared.contract import events, subjects
from shared.contract.asyncapi import channels
from tests.helpers import REPO


def test_asyncapi_document_lists_every_channel_with_its_schema():
    out = subprocess.run([sys.executable, "-m", "dicomflow", "asyncapi"], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin", "DICOMFLOW__STREAM__EVENTS_NAME": "HOSPITAL_EVENTS"}
                         ).stdout
    doc = json.loads(out)
    assert doc["asyncapi"].startswith("3.")
    by_address = {c["address"]: c for c in doc["channels"].values()}
    assert {ch.address for ch, _ in channels()} <= set(by_address)
    schemas = doc["components"]["schemas"]
    for _, model in channels():
        assert model.__name__ in schemas
        assert set(model.model_fields) <= set(schemas[model.__name__]["properties"])
    # Stream names come from the configuration, not literals.
    stored = by_address[f"{subjects.STORED_PREFIX}.{{study}}.{{sop}}"]
    assert "HOSPITAL_EVENTS" in json.dumps(stored)
    # the change subjects say they are in the change feed too; the others do not
    for address, channel in by_address.items():
        in_feed = subjects.CHANGES_STREAM in json.dumps(channel)
        assert in_feed == any(address.startswith(s.removesuffix(">")) for s in subjects.CHANGE_SUBJECTS), address
    assert subjects.CHANGES_STREAM in json.dumps(by_address[f"{subjects.STUDY_UPDATED_PREFIX}.{{study}}"])


def test_every_event_model_declares_channels_subject_and_id():
    declared = {obj for _, obj in inspect.getmembers(events, inspect.isclass)
                if issubclass(obj, events.Event) and obj is not events.Event}
    assert declared == set(events.EVENT_MODELS), "an event model is missing from EVENT_MODELS"
    for model in declared:
        assert model.channels, f"{model.__name__} declares no channel"
        assert "subject" in vars(model) and "msg_id" in vars(model), f"{model.__name__} lacks subject() or msg_id()"


def test_subjects_fit_their_channel_templates():
    now = datetime.now(UTC)
    tags = events.InstanceTags(study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5")
    job = events.ForwardJob(target="pacs", rule="r", study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5",
                            sop_class_uid="1.2", transfer_syntax_uid="1.2.840.10008.1.2.1", digest="ab" * 32, size=1,
                            backend="staging")
    complete = dict(study_uid="1.2.3", reason="quiet", instances=1, series=[], first_arrival=now, last_arrival=now,
                    completed_at=now)
    cases = [
        (events.InstanceReceived(tags=tags, transfer_syntax_uid="1.2", digest="ab" * 32, size=1, backend="staging",
                                 calling_ae="A", called_ae="B", received_at=now), "dicom.in.1_2_3.1_2_3_4_5"),
        (events.InstanceStored(tags=tags, transfer_syntax_uid="1.2", digest="ab" * 32, size=1, policy="p",
                               placements=["a"], calling_ae="A", stored_at=now), "dicom.stored.1_2_3.1_2_3_4_5"),
        (events.StudyComplete(generation=1, **complete), "dicom.study.complete.1_2_3"),
        (events.StudyComplete(generation=2, **complete), "dicom.study.updated.1_2_3"),
        (job, "router.out.pacs.1_2_3.1_2_3_4_5"),
        (events.DeadLetter(job=job, reason="x", attempts=3, failed_at=now, job_sequence=7),
         "dicom.dlq.pacs.1_2_3.1_2_3_4_5"),
        (events.AuditRecord(audit_id="ab12", kind="dlq-replay", action="E", outcome="minor-failure", event_time=now),
         "dicom.audit.dlq-replay.minor-failure"),
    ]
    for event, subject in cases:
        assert event.subject() == subject
        assert event.msg_id()
    # One model, two generations: two messages; a repeat of a generation is the same message.
    assert (events.StudyComplete(generation=1, **complete).msg_id()
            != events.StudyComplete(generation=2, **complete).msg_id())
