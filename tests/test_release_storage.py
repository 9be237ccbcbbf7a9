"""What the staging releaser asks of a backend, on the filesystem and on a real Ceph cluster: a listing with
sizes and mtimes, a removal that a put (or a resend's touch) of the same digest wins against."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from shared.config import FsBackendConfig, RadosBackendConfig
from shared.storage.fs_store import RELEASING, FileObjectStore
from shared.storage.objectstore import content_digest


@pytest.fixture(scope="module")
def ceph(tmp_path_factory):
    from tests.ceph_cluster import CephCluster

    c = CephCluster(tmp_path_factory.mktemp("ceph") / "c", osds=3, op_timeout_s=10).start()
    c.create_pool("staging")
    yield c
    c.stop()


@pytest.fixture(params=["fs", pytest.param("rados", marks=pytest.mark.ceph)])
def store(request, tmp_path):
    if request.param == "fs":
        s = FileObjectStore("staging", FsBackendConfig(path=str(tmp_path / "staging")), tmp_path)
    else:
        from shared.storage.rados_store import RadosObjectStore

        cluster = request.getfixturevalue("ceph")
        s = RadosObjectStore("staging", RadosBackendConfig(ceph_conf=str(cluster.conf), pool="staging",
                                                          namespace=f"t{time.time_ns()}", op_timeout_s=10))
    yield s
    s.close()


def _put(store, data: bytes) -> str:
    digest = content_digest(data)
    store.put(digest, data)
    return digest


def test_listing_names_every_object_with_its_size(store):
    small, large = b"x" * 100, os.urandom(300 * 1024)  # the log's path and the file's on fs
    a, b = _put(store, small), _put(store, large)
    listed = {o.digest: o for o in store.objects()}
    assert set(listed) == {a, b}
    assert listed[a].size == 100 and listed[b].size == len(large)
    assert all(abs(o.mtime - time.time()) < 30 for o in listed.values()), (listed, time.time())


def test_removal_only_of_what_was_not_written_after_the_judgement(store):
    a = _put(store, b"claim-check bytes")
    assert not store.remove_unless_touched(a, not_after=time.time() - 60)  # written after: kept
    assert store.exists(a)
    assert store.remove_unless_touched(a, not_after=time.time() + 5)
    assert not store.exists(a) and not list(store.objects())
    assert not store.remove_unless_touched(a, not_after=time.time() + 5)  # gone already: nothing to do


def test_a_resend_of_the_same_bytes_claims_them_again(store):
    data = b"the same instance sent twice"
    a = _put(store, data)
    judged = time.time() + (0.0 if isinstance(store, FileObjectStore) else 1.5)  # rados mtimes: whole seconds
    time.sleep(0.05 if isinstance(store, FileObjectStore) else 2.0)
    store.put(a, data)  # exists already: nothing is written, but the put touches it
    assert not store.remove_unless_touched(a, not_after=judged)
    assert store.get(a) == data


def test_fs_release_interrupted_by_a_crash_is_put_back_by_the_next_listing(tmp_path):
    store = FileObjectStore("staging", FsBackendConfig(path=str(tmp_path / "staging")), tmp_path)
    a = _put(store, b"renamed aside, then the releaser was killed")
    path = store.path(a)
    os.rename(path, str(path) + RELEASING)
    assert [o.digest for o in store.objects()] == [a]
    assert path.exists() and not Path(str(path) + RELEASING).exists()
    store.close()
