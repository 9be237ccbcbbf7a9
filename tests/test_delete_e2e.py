"""Deleting as a user does it against `dicomflow run`: DICOMweb DELETE (dicomweb-client), `dicomflow delete`,
rejection notes sent with dcmtk's storescu (lean engine) and pynetdicom (pynetdicom engine), and
`dicomflow retention` with its dry run, a hold and a forward in flight."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage, KeyObjectSelectionDocumentStorage

from dicomflow.natsserver import free_port
from dicomflow.synthetic import ct_instance, new_uid
from shared.catalogue.open import open_catalogue
from shared.config import load_config
from shared.storage.objectstore import Backends
from shared.tenancy import api_key_hash
from tests.helpers import REPO, scu_send, wait_for
from tests.test_deletion import rejection_note

KEY_A, KEY_B = "delete-key-a-0123456789", "delete-key-b-0123456789"


def _stack(stack_factory, engine: str = "lean", **sections):
    return stack_factory(
        ingest={"engine": engine},
        web={"port": free_port()},
        access={"anonymous_tenant": None,
                "tenants": {"a": {"aes": ["MODA"], "api_keys_sha256": [api_key_hash(KEY_A)]},
                            "b": {"aes": ["MODB"], "api_keys_sha256": [api_key_hash(KEY_B)]}}},
        **sections)


def write_files(folder: Path, datasets) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for ds in datasets:
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return folder


def a_study(n: int, series: int = 1):
    study_uid, series_uids = new_uid(), [new_uid() for _ in range(series)]
    return [ct_instance(study_uid, series_uids[i % series], i + 1, rows=8, cols=8) for i in range(n)]


def base(stack) -> str:
    return f"http://127.0.0.1:{stack.tree['web']['port']}/dicom-web"


def client(stack, key: str) -> DICOMwebClient:
    return DICOMwebClient(base(stack), headers={"X-API-Key": key})


def rows_of(stack, study_uid: str, tenant: str | None = None) -> list[dict]:
    config = load_config(stack.config_path, environ={})
    catalogue = open_catalogue(config.catalogue.url, config.data_path())
    try:
        return catalogue.instances(tenant, study_uid)
    finally:
        catalogue.close()


def until(fetch, ok, what: str, timeout: float = 60):
    """``fetch()`` once ``ok`` holds of it."""
    box = {}

    def probe():
        box["value"] = fetch()
        return ok(box["value"])
    wait_for(probe, timeout, what=what)
    return box["value"]


def stored(stack, study_uid: str, n: int, tenant: str | None = None) -> list[dict]:
    return until(lambda: rows_of(stack, study_uid, tenant), lambda r: len(r) == n,
                 f"{n} instances of {study_uid} stored")


def on_disk(stack, rows) -> list[bool]:
    backends = Backends(load_config(stack.config_path, environ={}))
    try:
        return [backends.get(p).exists(r["digest"]) for r in rows for p in r["placements"]]
    finally:
        backends.close()


def deleted_subjects(stack) -> dict[str, int]:
    """Subject -> messages of the dicom.deleted events in the events stream."""
    import nats

    async def go():
        nc = await nats.connect(f"nats://127.0.0.1:{stack.tree['nats']['port']}")
        try:
            info = await nc.jetstream().stream_info("DICOM_EVENTS", subjects_filter="dicom.deleted.>")
            return dict(info.state.subjects or {})
        finally:
            await nc.close()
    return asyncio.run(go())


def test_dicomweb_delete_instance_series_study_confined_to_the_tenant(stack_factory, tmp_path):
    stack = _stack(stack_factory)
    instances = a_study(4, series=2)
    s = instances[0].StudyInstanceUID
    assert stack.storescu(write_files(tmp_path / "a", instances), calling_ae="MODA").returncode == 0
    rows = stored(stack, s, 4)
    a, b = client(stack, KEY_A), client(stack, KEY_B)
    # another tenant's study is absent: 404, nothing deleted
    with pytest.raises(requests.HTTPError) as err:
        b.delete_study(s)
    assert err.value.response.status_code == 404 and err.value.response.text == "no such study\n"
    assert len(rows_of(stack, s)) == 4
    one = instances[0]
    a.delete_instance(s, one.SeriesInstanceUID, one.SOPInstanceUID)
    assert len(a.search_for_instances(s)) == 3
    gone = [r for r in rows if r["sop_uid"] == one.SOPInstanceUID]
    assert on_disk(stack, gone) == [False]
    a.delete_series(s, instances[1].SeriesInstanceUID)
    assert sorted(i["00080018"]["Value"][0] for i in a.search_for_instances(s)) == \
        sorted([instances[2].SOPInstanceUID])
    a.delete_study(s)
    assert a.search_for_studies(search_filters={"StudyInstanceUID": s}) == []
    assert not any(on_disk(stack, rows))
    for call in (lambda: a.delete_study(s), lambda: a.retrieve_study_metadata(s)):
        with pytest.raises(requests.HTTPError) as err:
            call()
        assert err.value.response.status_code == 404
    res = requests.delete(f"{base(stack)}/studies/...", headers={"X-API-Key": KEY_A})
    assert res.status_code == 400
    # one dicom.deleted event per instance; one audit record (action D) per request that deleted
    events = until(lambda: deleted_subjects(stack), lambda e: len(e) == 4, "4 deleted events", 30)
    assert all(count == 1 for count in events.values())
    records = until(lambda: json.loads(stack.cli("audit", "--json", "--event", "deletion").stdout),
                    lambda r: len(r) == 3, "3 deletion audit records", 30)
    assert {r["action"] for r in records} == {"D"} and {r["tenant"] for r in records} == {"a"}
    assert sorted(int(r["detail"]["deleted"]) for r in records) == [1, 1, 2]


@pytest.mark.parametrize("engine", ["lean", "pynetdicom", "stow"])
def test_a_rejection_note_deletes_what_it_references_in_its_tenant(stack_factory, tmp_path, engine):
    stack = _stack(stack_factory, "lean" if engine == "stow" else engine)
    instances = a_study(3)
    s = instances[0].StudyInstanceUID
    # both tenants hold the same UIDs and bytes (one object each, shared)
    assert stack.storescu(write_files(tmp_path / "a", instances), calling_ae="MODA").returncode == 0
    assert stack.storescu(write_files(tmp_path / "a", instances), calling_ae="MODB").returncode == 0
    stored(stack, s, 3, "a")
    b_rows = stored(stack, s, 3, "b")
    note = rejection_note("113001", instances[:2])  # Rejected for Quality Reasons
    note.file_meta = FileMetaDataset()
    note.file_meta.MediaStorageSOPClassUID = note.SOPClassUID
    note.file_meta.MediaStorageSOPInstanceUID = note.SOPInstanceUID
    note.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if engine == "lean":  # dcmtk's storescu sends the note's file
        assert stack.storescu(write_files(tmp_path / "note", [note]), calling_ae="MODA").returncode == 0
    elif engine == "stow":  # STOW-RS with tenant a's key
        client(stack, KEY_A).store_instances([note])
    else:
        assert scu_send(stack.port, [note], calling="MODA",
                        contexts=(KeyObjectSelectionDocumentStorage, CTImageStorage)) == [0]
    # the note is kept, the two instances it rejects are gone; tenant b's are untouched, and so are the bytes
    left = until(lambda: rows_of(stack, s, "a"), lambda r: {x["sop_uid"] for x in r} ==
                 {instances[2].SOPInstanceUID, note.SOPInstanceUID}, "the rejection applied")
    assert {x["sop_class_uid"] for x in left} == {CTImageStorage, KeyObjectSelectionDocumentStorage}
    assert rows_of(stack, s, "b") == b_rows and all(on_disk(stack, b_rows))
    wait_for(lambda: len(deleted_subjects(stack)) == 2, 30, what="2 deleted events")


def test_cli_delete_and_retention(stack_factory, tmp_path):
    stack = _stack(stack_factory, deletion={"retention_days": {"a": 2 / 86400}, "holds": {}})
    old, held, busy, dead, other = a_study(2), a_study(1), a_study(1), a_study(1), a_study(1)
    stack.tree["deletion"]["holds"] = {"a": [str(held[0].StudyInstanceUID)]}
    from tests.helpers import write_config
    write_config(tmp_path, stack.tree)  # the CLI reads the hold; the running services need not
    for name, datasets, ae in (("old", old, "MODA"), ("held", held, "MODA"), ("busy", busy, "MODA"),
                               ("dead", dead, "MODA"), ("other", other, "MODB")):
        assert stack.storescu(write_files(tmp_path / name, datasets), calling_ae=ae).returncode == 0
    for datasets in (old, held, busy, dead, other):
        stored(stack, datasets[0].StudyInstanceUID, len(datasets))
    _queue_forward_job(stack, busy[0])  # a forward of "busy" waits in ROUTER_OUT
    _queue_forward_job(stack, dead[0], dead_letter=True)  # one of "dead" was dead-lettered

    # dicomflow delete: arguments, dry run, tenant confinement, then for real
    s = old[0].StudyInstanceUID
    assert stack.cli("delete", "--study", s, "--instance", old[0].SOPInstanceUID, check=False).returncode == 2
    assert stack.cli("delete", "--study", "...", check=False).returncode == 2
    dry = json.loads(stack.cli("delete", "--study", s, "--dry-run", "--json").stdout)
    assert dry["dry_run"] and dry["instances"] == 2 and len(rows_of(stack, s)) == 2
    assert stack.cli("delete", "--study", s, "--tenant", "b", check=False).returncode == 1
    out = json.loads(stack.cli("delete", "--study", s, "--series", old[0].SeriesInstanceUID,
                               "--instance", old[0].SOPInstanceUID, "--tenant", "a", "--json").stdout)
    assert out["instances"] == 1 and out["objects_removed"] == {"local": 1} and out["events_not_published"] == 0
    assert len(rows_of(stack, s)) == 1

    time.sleep(2.5)  # every study of tenant a is past its retention now
    verdicts = {v["study_uid"]: v for v in map(json.loads, stack.cli("retention", "--dry-run", "--json")
                                               .stdout.splitlines())}
    assert verdicts[s]["action"] == "delete"
    assert (verdicts[held[0].StudyInstanceUID]["action"], verdicts[held[0].StudyInstanceUID]["why"]) == \
        ("keep", "on hold")
    assert (verdicts[busy[0].StudyInstanceUID]["action"], verdicts[busy[0].StudyInstanceUID]["why"]) == \
        ("keep", "a forward is in flight")
    assert verdicts[dead[0].StudyInstanceUID]["why"] == "a forward is in flight"
    assert verdicts[other[0].StudyInstanceUID]["why"] == "the tenant keeps studies forever"
    assert len(rows_of(stack, s)) == 1  # the dry run deleted nothing
    text = stack.cli("retention").stdout
    assert "1 of 5 studies deleted" in text
    assert rows_of(stack, s) == []
    for datasets in (held, busy, dead, other):
        assert len(rows_of(stack, datasets[0].StudyInstanceUID)) == 1
    # --tenant: only that tenant's studies; --every: a pass each retention_interval_s until stopped
    only_b = [json.loads(line) for line in stack.cli("retention", "--tenant", "b", "--dry-run", "--json").stdout
              .splitlines()]
    assert [(v["tenant"], v["study_uid"]) for v in only_b] == [("b", other[0].StudyInstanceUID)]
    stack.tree["deletion"]["retention_interval_s"] = 0.5
    write_config(tmp_path, stack.tree)
    proc = subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(stack.config_path), "retention",
                             "--every", "--tenant", "b", "--json"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")})
    try:
        passes = [json.loads(proc.stdout.readline()) for _ in range(2)]  # b's one study, once per pass
        assert [p["study_uid"] for p in passes] == [other[0].StudyInstanceUID] * 2
    finally:
        proc.terminate()
        proc.wait(30)
    kinds = json.loads(stack.cli("audit", "--json", "--event", "deletion").stdout)
    assert sorted(r["detail"]["reason"] for r in kinds) == ["request", "retention"]


def _queue_forward_job(stack, ds, dead_letter: bool = False) -> None:
    """Put a real forward job of ``ds``'s study in ROUTER_OUT, as the router does for a target that is down, or
    (``dead_letter``) its dead letter in DICOM_DLQ, as the router leaves a job that failed every attempt."""
    import nats

    from shared.bus.jetstream import ensure_stream
    from shared.contract.events import DeadLetter, ForwardJob, utcnow
    from shared.contract.subjects import dlq_stream_config, out_stream_config

    config = load_config(stack.config_path, environ={})

    async def go():
        nc = await nats.connect(f"nats://127.0.0.1:{stack.tree['nats']['port']}")
        try:
            await ensure_stream(nc, (dlq_stream_config if dead_letter else out_stream_config)(config.stream))
            job = ForwardJob(target="pacs", rule="all", study_uid=ds.StudyInstanceUID,
                             series_uid=ds.SeriesInstanceUID, sop_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                             transfer_syntax_uid="1.2.840.10008.1.2.1", digest="0" * 64, size=1, backend="local")
            if dead_letter:
                job = DeadLetter(job=job, reason="refused", attempts=5, failed_at=utcnow(), job_sequence=1)
            await nc.jetstream().publish(job.subject(), job.model_dump_json().encode())
        finally:
            await nc.close()
    asyncio.run(go())


def test_retention_keeps_a_study_the_router_has_not_completed(stack_factory, tmp_path):
    """A study still open in the router's state (its forward on completion not yet made) is kept, whatever its age."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: all, action: forward, to: PACS, when: complete}\n")
    stack = _stack(stack_factory, deletion={"retention_days": {"a": 1 / 86400}},
                   router={"rules_file": str(rules), "completion": {"quiet_s": 3600},
                           "targets": {"PACS": {"kind": "dicom", "port": free_port(), "ae_title": "PACS"}}})
    instances = a_study(2)
    s = instances[0].StudyInstanceUID
    assert stack.storescu(write_files(tmp_path / "open", instances), calling_ae="MODA").returncode == 0
    stored(stack, s, 2)
    until(lambda: json.loads(stack.cli("study", s, "--json").stdout)["routing"], lambda r: isinstance(r, dict)
          and r.get("count") == 2, "the router's state of the study")
    time.sleep(1.5)
    [verdict] = [json.loads(line) for line in stack.cli("retention", "--json").stdout.splitlines()]
    assert (verdict["study_uid"], verdict["action"], verdict["why"]) == (s, "keep", "a forward is in flight")
    assert len(rows_of(stack, s)) == 2
