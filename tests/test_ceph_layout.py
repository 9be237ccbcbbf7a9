"""Pure parts of the Ceph backend, without a cluster: chunk plans, manifests, index entries, policy verdicts."""

from __future__ import annotations

import pytest

from services.store.policy_check import BackendCheck, verdict
from services.store.study_index import decode_entry, encode_entry
from shared.config import StorageConfig
from shared.contract.events import InstanceReceived, InstanceTags, utcnow
from shared.storage.rados_layout import decode_manifest, encode_manifest, plan_chunks, study_index_name, xattrs_for

D = "ab" * 32


def test_small_objects_are_not_chunked():
    assert plan_chunks(D, 0, 1024) == []
    assert plan_chunks(D, 1024, 1024) == []


def test_chunks_cover_the_object_exactly():
    chunks = plan_chunks(D, 200 * 2**20 + 7, 64 * 2**20)
    assert [c.name for c in chunks] == [f"{D}.{n:05d}" for n in range(4)]
    assert [c.size for c in chunks] == [64 * 2**20] * 3 + [8 * 2**20 + 7]
    assert all(c.offset == n * 64 * 2**20 for n, c in enumerate(chunks))


def test_manifest_round_trip_and_inconsistencies():
    chunks = [c.__class__(c.name, c.offset, c.size, "cd" * 32) for c in plan_chunks(D, 2500, 1000)]
    size, back = decode_manifest(encode_manifest(D, 2500, chunks), D)
    assert size == 2500 and back == chunks
    with pytest.raises(ValueError, match="names"):
        decode_manifest(encode_manifest(D, 2500, chunks), "ef" * 32)
    with pytest.raises(ValueError, match="cover"):
        decode_manifest(encode_manifest(D, 2600, chunks), D)
    with pytest.raises(ValueError, match="continue"):
        decode_manifest(encode_manifest(D, 2500, [chunks[0], chunks[2], chunks[1]]), D)
    with pytest.raises(ValueError, match="unreadable"):
        decode_manifest(b"\x00garbage", D)


def test_xattrs_carry_uids_size_digest_and_layout():
    attrs = xattrs_for(D, 12, "whole", {"sop_uid": "1.2", "study_uid": "1"})
    assert attrs == {"dicomflow.sop_uid": b"1.2", "dicomflow.study_uid": b"1", "dicomflow.digest": D.encode(),
                     "dicomflow.size": b"12", "dicomflow.layout": b"whole"}
    assert study_index_name("1.2.3") == "dicomflow.study.1.2.3"


def test_index_entry_round_trip():
    ev = InstanceReceived(tags=InstanceTags(study_uid="1.2", series_uid="1.2.1", sop_uid="1.2.1.1", modality="CT",
                                            series_number=1, instance_number=4),
                          transfer_syntax_uid="1.2.840.10008.1.2.1", digest=D, size=10, backend="staging",
                          calling_ae="INST_A", called_ae="DICOMFLOW", received_at=utcnow())
    back, policy, placements, stored_at = decode_entry(encode_entry(ev, "p", ["x", "y"], "2026-01-01T00:00:00+00:00"))
    assert back == ev and policy == "p" and placements == ["x", "y"] and stored_at == "2026-01-01T00:00:00+00:00"


def test_policy_verdict():
    storage = StorageConfig(backends={"local": {}, "a": {"kind": "rados", "pool": "a"}, "b": {"kind": "rados", "pool": "b"}},
                            policies={"pa": {"placements": ["a"]}, "pab": {"placements": ["a", "b"]}},
                            institutions={"X": "pa", "Y": "pab"}, default_policy=None, staging="local")
    checks = {n: BackendCheck(n, "rados", n, n != "b", "") for n in ("local", "a", "b")}
    v = verdict(storage, checks)
    assert not v["ok"]
    assert v["policies"]["pa"]["ok"] and v["policies"]["pab"] == {"placements": ["a", "b"], "ok": False, "failing": ["b"]}
    assert v["institutions"] == {"X": {"policy": "pa", "ok": True}, "Y": {"policy": "pab", "ok": False}}
    assert v["default_policy"]["policy"] is None
    checks["b"] = BackendCheck("b", "rados", "b", True, "")
    assert verdict(storage, checks)["ok"]
