"""Deletion over a real Ceph cluster: objects (chunked ones with their chunks) removed from the pool, shared
bytes kept for the instance that still holds them, tombstones in the study index omaps."""

from __future__ import annotations

import pytest

from dicomflow.synthetic import ct_instance, new_uid
from shared.catalogue.open import open_catalogue
from shared.config import load_config
from shared.deletion.execute import delete
from shared.deletion.plan import Target
from shared.storage.objectstore import Backends
from shared.storage.rados_layout import study_index_name
from tests.ceph_cluster import CephCluster
from tests.test_deletion import put


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = CephCluster(tmp_path_factory.mktemp("ceph") / "c", osds=1, op_timeout_s=10).start()
    c.create_pool("objects")
    yield c
    c.stop()


def test_delete_from_ceph_and_fs_placements(cluster, tmp_path):
    config = load_config(None, environ={}, overrides={
        "data_dir": str(tmp_path),
        "storage": {"backends": {"local": {"kind": "fs", "path": "objects"},
                                 "ceph": {"kind": "rados", "ceph_conf": str(cluster.conf), "pool": "objects",
                                          "op_timeout_s": 10, "chunk_bytes": 1024}}}})
    catalogue = open_catalogue("", tmp_path)
    backends = Backends(config)
    ceph = backends.get("ceph")
    try:
        study_uid, series_uid = new_uid(), new_uid()
        # 32x32 CTs: over 1 KiB, so each is chunks plus a manifest in the pool
        instances = [ct_instance(study_uid, series_uid, i + 1, rows=32, cols=32) for i in range(3)]
        s = instances[0].StudyInstanceUID
        digests = put(catalogue, backends, instances, tenant="a", placements=("local", "ceph"))
        put(catalogue, backends, instances[:1], tenant="b", placements=("ceph",))  # b shares one object in ceph
        ceph.omap_set_many([(study_index_name(s), {f"a/{ds.SOPInstanceUID}": b"{}" for ds in instances})])
        before = set(ceph.object_names())
        assert len(before) > 3 + 1  # chunks, manifests, the index object

        out = delete(catalogue, backends, Target("a", s), "retention", "retention")
        shared_digest = digests[instances[0].SOPInstanceUID]
        assert out.removed == {"ceph": sorted(d for d in digests.values() if d != shared_digest),
                               "local": sorted(digests.values())}
        assert out.failed == []
        assert ceph.exists(shared_digest) and ceph.get(shared_digest)  # b's instance still reads its bytes
        for d in digests.values():
            if d != shared_digest:
                assert not ceph.exists(d)
        # every chunk of the removed objects went with its manifest: only b's object, its chunks and the index
        left = set(ceph.object_names())
        assert study_index_name(s) in left
        assert all(not name.startswith(d) for name in left for d in digests.values() if d != shared_digest)
        index = ceph.omap_get(study_index_name(s))  # tombstones: empty values (librados reads them as None)
        assert sorted(index) == sorted(f"a/{ds.SOPInstanceUID}" for ds in instances) and not any(index.values())
        assert [e.objects_removed for e in out.events if e.sop_uid == instances[0].SOPInstanceUID] == [["local"]]
        out = delete(catalogue, backends, Target("b", s), "request", "t")
        assert out.removed == {"ceph": [shared_digest]} and not ceph.exists(shared_digest)
    finally:
        backends.close()
        catalogue.close()
