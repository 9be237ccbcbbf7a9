"""Per-institution placement on a real Ceph cluster, end to end: storescu -> dicomflow run (ingest staging in a
Ceph pool, NATS, store) -> RADOS pools under per-datacenter CRUSH rules; then the only dc-b OSD is killed."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import blake3
import nats
import pytest

from dicomflow.synthetic import write_study
from services.store import study_index
from shared.bus.jetstream import api
from shared.config import RadosBackendConfig
from shared.storage.rados_store import RadosObjectStore
from tests.ceph_cluster import CephCluster
from tests.helpers import dataset_bytes, wait_for

pytestmark = pytest.mark.ceph

DC_A, DC_B = {0, 1}, {2}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # osd.2, the only dc-b OSD, is bluestore: it is SIGKILLed and must come back with its data (memstore would not)
    c = CephCluster(tmp_path_factory.mktemp("ceph") / "c", osds=3, bluestore={2}, op_timeout_s=10).start()
    c.create_pool("dicom-everywhere", "everywhere", size=2)   # one copy in each datacenter
    c.create_pool("dicom-regional-b", "regional-b", size=1)   # dc-b only
    c.create_pool("dicom-staging", "regional-a", size=2)      # the ingest's claim-check, dc-a only
    yield c
    c.stop()


def _storage(cluster: CephCluster) -> dict:
    rados = {"kind": "rados", "ceph_conf": str(cluster.conf), "op_timeout_s": 5}
    return {
        "staging": "staging",
        "backends": {"staging": {**rados, "pool": "dicom-staging"},
                     "everywhere": {**rados, "pool": "dicom-everywhere", "namespace": "inst-a"},
                     "regional-b": {**rados, "pool": "dicom-regional-b"}},
        "policies": {"replicate-all": {"placements": ["everywhere"]}, "regional-b": {"placements": ["regional-b"]}},
        "institutions": {"INST_A": "replicate-all", "INST_B": "regional-b"},
        "default_policy": None,
    }


def _events(url: str, subject: str) -> int:
    async def go():
        nc = await nats.connect(url)
        try:
            info = await api(nc, "STREAM.INFO.DICOM_EVENTS", {"subjects_filter": subject})
            return sum((info["state"].get("subjects") or {}).values())
        finally:
            await nc.close()
    return asyncio.run(go())


def _digests(files: list[Path]) -> set[str]:
    return {blake3.blake3(dataset_bytes(p)).hexdigest() for p in files}


def _open(cluster: CephCluster, pool: str, namespace: str = "") -> RadosObjectStore:
    return RadosObjectStore(pool, RadosBackendConfig(ceph_conf=str(cluster.conf), pool=pool,
                                                namespace=namespace, op_timeout_s=30))


def _index_rows(path: Path) -> list[dict]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(
            "SELECT tenant, sop_uid, study_uid, series_uid, digest, size, policy, placements, calling_ae, stored_at,"
            " metadata FROM instances ORDER BY sop_uid")]
    finally:
        conn.close()


def test_institution_placement_outage_and_reindex(tmp_path, nats_server, stack_factory, cluster):
    stack = stack_factory(nats_server.url, storage=_storage(cluster))
    everywhere = _open(cluster, "dicom-everywhere", "inst-a")
    regional_b = _open(cluster, "dicom-regional-b")
    try:
        study_a, files_a = write_study(tmp_path / "a", 6, institution="Hospital A")
        study_b, files_b = write_study(tmp_path / "b", 6, institution="Clinic B")
        assert stack.storescu(tmp_path / "a", calling_ae="INST_A").returncode == 0
        assert stack.storescu(tmp_path / "b", calling_ae="INST_B").returncode == 0
        wait_for(lambda: stack.instances_of(study_a) == 6 and stack.instances_of(study_b) == 6, 90,
                 what="both studies stored")

        # A: in the "everywhere" pool, each object with one copy per datacenter; B: on dc-b OSDs only.
        for digest in _digests(files_a):
            assert everywhere.get(digest) == next(dataset_bytes(p) for p in files_a
                                                  if blake3.blake3(dataset_bytes(p)).hexdigest() == digest)
            assert not regional_b.exists(digest)
        for digest in list(_digests(files_a))[:3]:
            acting = set(cluster.osd_map("dicom-everywhere", digest, "inst-a")["acting"])
            assert len(acting) == 2 and len(acting & DC_A) == 1 and acting & DC_B, acting
        for digest in _digests(files_b):
            assert regional_b.exists(digest) and not everywhere.exists(digest)
        for digest in list(_digests(files_b))[:3]:
            assert set(cluster.osd_map("dicom-regional-b", digest)["acting"]) == DC_B
        # The per-study index objects list each study from Ceph alone.
        entries = study_index.study_entries(everywhere, study_a)
        assert len(entries) == 6
        assert {study_index.decode_entry(v)[0].digest for v in entries.values()} == _digests(files_a)
        assert study_index.studies_in(regional_b) == [study_b]

        # Byte-identical through the product's own read path.
        stack.cli("export", "--study", study_b, "--out", str(tmp_path / "out-b"))
        assert _digests(sorted((tmp_path / "out-b").glob("*.dcm"))) == _digests(files_b)

        # Unknown institution and no default policy: rejected (dicom.rejected), not stored.
        study_x, _ = write_study(tmp_path / "x", 2, institution="Nobody")
        assert stack.storescu(tmp_path / "x", calling_ae="STRANGER").returncode == 0
        wait_for(lambda: _events(nats_server.url, "dicom.rejected.>") == 2, 60, what="2 rejected events")
        assert stack.instances_of(study_x) == 0

        # `dicomflow reindex` rebuilds the same index from Ceph alone.
        original = stack.data_dir / "catalogue.sqlite"
        rebuilt = tmp_path / "rebuilt.sqlite"
        stack.cli("reindex", "--out", str(rebuilt))
        assert _index_rows(rebuilt) == _index_rows(original)
        assert len(_index_rows(rebuilt)) == 12

        # ---- the only dc-b OSD dies
        cluster.kill_osd(2)
        study_a2, files_a2 = write_study(tmp_path / "a2", 3, institution="Hospital A")
        assert stack.storescu(tmp_path / "a2", calling_ae="INST_A").returncode == 0
        wait_for(lambda: stack.instances_of(study_a2) == 3, 90, what="institution A stored during the outage")
        for digest in _digests(files_a2):
            assert set(cluster.osd_map("dicom-everywhere", digest, "inst-a")["acting"]) <= DC_A

        study_b2, files_b2 = write_study(tmp_path / "b2", 3, institution="Clinic B")
        # The ingest still accepts (its staging pool is in dc-a); the store cannot place B and says why.
        assert stack.storescu(tmp_path / "b2", calling_ae="INST_B").returncode == 0
        wait_for(lambda: any("pool 'dicom-regional-b': timed out after 5s (rados_osd_op_timeout)" in line
                             for line in stack.log.read_text(errors="replace").splitlines()), 90,
                 what="the store's timeout error for the regional-b pool")
        assert stack.instances_of(study_b2) == 0
        assert _events(nats_server.url, f"dicom.stored.{study_b2}.*") == 0

        # ---- it comes back: redelivery places B2; nothing acknowledged before was lost
        cluster.start_osd(2)
        wait_for(lambda: stack.instances_of(study_b2) == 3, 180, interval=0.5, what="B2 stored after the OSD returned")
        for files, store in ((files_a, everywhere), (files_a2, everywhere), (files_b, regional_b),
                             (files_b2, regional_b)):
            for p in files:
                data = dataset_bytes(p)
                assert store.get(blake3.blake3(data).hexdigest()) == data
        assert _events(nats_server.url, "dicom.stored.>") == 6 + 6 + 3 + 3
    finally:
        everywhere.close()
        regional_b.close()
