"""The RADOS backend against a real Ceph cluster: xattrs, chunking, corruption, cephx caps, `policies check`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MultiFrameGrayscaleWordSecondaryCaptureImageStorage

from dicomflow.synthetic import new_uid
from shared.config import RadosBackendConfig
from shared.storage.objectstore import CorruptObject, ObjectMissing, ObjectStore, content_digest
from shared.storage.rados_layout import chunk_name
from shared.storage.rados_store import RadosObjectStore
from tests.ceph_cluster import CephCluster
from tests.helpers import REPO, make_config, write_config

pytestmark = pytest.mark.ceph


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = CephCluster(tmp_path_factory.mktemp("ceph") / "c", osds=3, op_timeout_s=10).start()
    for pool in ("objects", "allowed", "forbidden"):
        c.create_pool(pool)
    yield c
    c.stop()


def _backend(cluster: CephCluster, **kw) -> RadosBackendConfig:
    return RadosBackendConfig(**{"ceph_conf": str(cluster.conf), "pool": "objects", "op_timeout_s": 10,
                               **kw})


def test_round_trip_with_xattrs_and_namespace(cluster):
    store = RadosObjectStore("ceph", _backend(cluster, namespace="inst-a"))
    try:
        assert isinstance(store, ObjectStore)
        data = b"DICM-ish bytes " * 1000
        digest = content_digest(data)
        assert not store.exists(digest)
        with pytest.raises(ObjectMissing):
            store.get(digest)
        meta = {"sop_uid": "1.2.3.4", "study_uid": "1.2.3", "series_uid": "1.2.3.5", "size": str(len(data))}
        store.put(digest, data, meta)
        store.put(digest, data, meta)  # idempotent
        assert store.exists(digest) and store.get(digest) == data
        attrs = store.xattrs(digest)
        assert attrs["sop_uid"] == "1.2.3.4" and attrs["study_uid"] == "1.2.3" and attrs["series_uid"] == "1.2.3.5"
        assert attrs["digest"] == digest and attrs["size"] == str(len(data)) and attrs["layout"] == "whole"
        assert store.location(digest) == f"rados://objects/inst-a/{digest}"
        # The namespace isolates: the default namespace of the same pool does not see it.
        plain = RadosObjectStore("plain", _backend(cluster))
        try:
            assert not plain.exists(digest)
        finally:
            plain.close()
        # Bytes changed behind the store's back are reported, not returned.
        store.io.write(digest, b"\x00", 10)
        with pytest.raises(CorruptObject):
            store.get(digest)
    finally:
        store.close()


def _multiframe(frames: int, rows: int, cols: int) -> bytes:
    """The data set bytes (no file meta) of a multiframe secondary capture image with noisy pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.SOPInstanceUID = new_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = new_uid(), new_uid()
    ds.Modality = "OT"
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.random.default_rng(7).integers(0, 65535, (frames, rows, cols), dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return buf.getvalue()


def test_200_mib_multiframe_chunked_round_trip_and_flipped_byte(cluster):
    data = _multiframe(100, 1024, 1024)  # 200 MiB of pixels: above the OSD's 128 MiB object limit
    assert len(data) > 200 * 2**20
    digest = content_digest(data)
    store = RadosObjectStore("ceph", _backend(cluster, chunk_bytes=64 * 2**20, aio_window=4))
    try:
        store.put(digest, data, {"sop_uid": "1.2.3"})
        attrs = store.xattrs(digest)
        assert attrs["layout"] == "chunked" and attrs["size"] == str(len(data))
        for n in range(4):  # 4 chunks of at most 64 MiB, each its own RADOS object
            size, _ = store.io.stat(chunk_name(digest, n))
            assert 0 < size <= 64 * 2**20
        back = store.get(digest)
        assert back == data
        del back
        # ranged reads (a retrieve streams 1 MiB at a time): across a chunk boundary, at the end, and a sweep
        edge = 64 * 2**20
        assert store.read_range(digest, edge - 10, 20) == (data[edge - 10:edge + 10], len(data))
        assert store.read_range(digest, len(data) - 5, 100) == (data[-5:], len(data))
        swept = bytearray()
        while len(swept) < len(data):
            chunk, _ = store.read_range(digest, len(swept), 2**20)
            swept += chunk
        assert swept == data
        del swept
        # Flip one byte inside the third chunk: the read reports it (naming the chunk) instead of returning it.
        name = chunk_name(digest, 2)
        orig = store.io.read(name, length=1, offset=12345)
        store.io.write(name, bytes([orig[0] ^ 0xFF]), 12345)
        with pytest.raises(CorruptObject, match=name):
            store.get(digest)
    finally:
        store.remove(digest)  # memstore OSDs hold data in RAM: give it back
        assert not store.exists(digest)
        store.close()


def test_per_pool_caps_surface_permission_error(cluster):
    keyring = cluster.create_user("dicomstore", "allow rw pool=allowed")
    ok = RadosObjectStore("allowed", _backend(cluster, pool="allowed", ceph_user="dicomstore", keyring=str(keyring)))
    denied = RadosObjectStore("forbidden", _backend(cluster, pool="forbidden", ceph_user="dicomstore",
                                                    keyring=str(keyring)))
    try:
        data = b"instance bytes"
        ok.put(content_digest(data), data)
        assert ok.get(content_digest(data)) == data
        with pytest.raises(PermissionError, match=r"client\.dicomstore .*pool 'forbidden'"):
            denied.put(content_digest(data), data)
    finally:
        ok.close()
        denied.close()


def test_put_many_shares_a_small_window_between_threads_and_batches_omap_writes(cluster):
    """Four threads write 40 objects of ~300 KiB each through one backend whose window (3 writes, 1 MiB) is
    far smaller than their writes in flight: each finishes its own completions to free room, so none waits
    on another forever; the byte budget holds; every object lands whole. Then a batch of study index
    objects goes out in one call."""
    store = RadosObjectStore("ceph", _backend(cluster, namespace="window", aio_window=3, aio_window_bytes=1024**2))
    outcomes: dict[int, list] = {}
    bodies = {t: [f"thread {t} object {i} ".encode() * (16000 + i) for i in range(40)] for t in range(4)}

    def writer(t: int) -> None:
        outcomes[t] = store.put_many((content_digest(b), b, {"sop_uid": f"1.2.{t}.{i}"})
                                     for i, b in enumerate(bodies[t]))

    try:
        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not any(th.is_alive() for th in threads), "a writer is stuck waiting for a window slot"
        assert all(err is None for t in range(4) for err in outcomes[t])
        for t in range(4):
            for body in bodies[t]:
                assert store.get(content_digest(body)) == body
        assert 0 < store.bytes_in_flight_peak <= 1024**2
        assert store._window.acquire(blocking=False) and store._bytes_in_flight == 0  # every slot came back
        store._window.release()

        writes = [(f"study.1.2.{n}", {f"1.2.{n}.{i}": f"entry {i}".encode() for i in range(5)}) for n in range(10)]
        assert store.omap_set_many(writes) == [None] * 10
        for oid, entries in writes:
            assert store.omap_get(oid) == entries
    finally:
        store.close()


def test_omap_writes_report_a_failure_per_object(cluster):
    keyring = cluster.create_user("indexer", "allow rw pool=allowed")
    denied = RadosObjectStore("forbidden", _backend(cluster, pool="forbidden", ceph_user="indexer",
                                                    keyring=str(keyring)))
    try:
        errors = denied.omap_set_many([("study.a", {"k": b"v"}), ("study.b", {"k": b"v"})])
        assert len(errors) == 2 and all(isinstance(e, PermissionError) for e in errors)
        assert "write omap of study.a" in str(errors[0]) and "write omap of study.b" in str(errors[1])
    finally:
        denied.close()


def _policies_check(tmp_path, storage: dict) -> tuple[int, dict]:
    cfg = write_config(tmp_path, make_config(tmp_path, storage=storage))
    res = subprocess.run([sys.executable, "-m", "dicomflow", "--config", str(cfg), "policies", "check", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    return res.returncode, json.loads(res.stdout)


def test_policies_check_against_the_live_cluster(cluster, tmp_path):
    keyring = cluster.create_user("checker", "allow rw pool=allowed")
    conf = str(cluster.conf)
    rados = {"kind": "rados", "ceph_conf": conf, "op_timeout_s": 10}
    good = {"staging": "local",
            "backends": {"local": {"kind": "fs"}, "ceph": {**rados, "pool": "objects", "namespace": "inst-a"}},
            "policies": {"a": {"placements": ["ceph"]}, "both": {"placements": ["local", "ceph"]}},
            "institutions": {"INST_A": "a"}, "default_policy": None}
    rc, report = _policies_check(tmp_path, good)
    assert rc == 0, report
    assert report["ok"] and report["policies"]["a"]["ok"] and report["backends"]["ceph"]["ok"]
    assert report["default_policy"]["policy"] is None

    bad = {"staging": "local",
           "backends": {"local": {"kind": "fs"}, "ceph": {**rados, "pool": "objects"},
                        "nopool": {**rados, "pool": "no-such-pool"},
                        "nocaps": {**rados, "pool": "forbidden", "ceph_user": "checker", "keyring": str(keyring)}},
           "policies": {"a": {"placements": ["ceph"]}, "b": {"placements": ["ceph", "nopool"]},
                        "c": {"placements": ["nocaps"]}},
           "institutions": {"INST_A": "a", "INST_B": "b", "INST_C": "c"}, "default_policy": "a"}
    rc, report = _policies_check(tmp_path, bad)
    assert rc == 1
    assert report["policies"]["a"]["ok"]
    assert report["policies"]["b"] == {"placements": ["ceph", "nopool"], "ok": False, "failing": ["nopool"]}
    assert "no-such-pool" in report["backends"]["nopool"]["detail"]
    assert "PermissionError" in report["backends"]["nocaps"]["detail"]
    assert report["institutions"]["INST_C"] == {"policy": "c", "ok": False}
