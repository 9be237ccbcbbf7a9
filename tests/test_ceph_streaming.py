"""The RADOS backend's streaming writer against a real Ceph cluster: an object written chunk by chunk as its bytes
arrive has exactly put's layout (every reader sees the same object), appears only at commit, leaves nothing
visible when its writer is killed or closed before it, and costs its process about a chunk of memory."""

from __future__ import annotations

import json
import subprocess
import sys

import blake3
import pytest

from shared.config import RadosBackendConfig
from shared.storage.objectstore import CorruptObject, ObjectMissing, content_digest
from shared.storage.rados_layout import LAYOUT_CHUNKED, chunk_name, decode_manifest, plan_chunks
from shared.storage.rados_store import RadosObjectStore, RadosWriter
from tests.ceph_cluster import CephCluster
from tests.helpers import REPO

pytestmark = pytest.mark.ceph

# Off any 1 MiB boundary, so chunk edges fall inside the pieces the writer is given.
CHUNK = 16 * 2**20 + 4097
BLOCK = 2**20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = CephCluster(tmp_path_factory.mktemp("ceph") / "c", osds=1, osd_gb=2, op_timeout_s=10).start()
    c.create_pool("objects")
    yield c
    c.stop()


def _backend(cluster: CephCluster) -> RadosBackendConfig:
    return RadosBackendConfig(ceph_conf=str(cluster.conf), pool="objects", op_timeout_s=10, chunk_bytes=CHUNK)


# The child builds the object from a seed one block at a time, so the parent can rebuild it; its peak RSS is
# read before its first write and after its commit (or when it is about to be killed).
_CHILD = """
import json, os, signal, sys
sys.path.insert(0, {repo!r})
import blake3
from shared.config import RadosBackendConfig
from shared.storage.rados_store import RadosObjectStore

def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))

cfg = RadosBackendConfig(**json.loads(sys.argv[1]))
seed, blocks, tail, digest, kill_after = sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
store = RadosObjectStore("ceph", cfg)
w = store.writer(10**10, digest)
before = peak()
for i in range(blocks + 1):
    block = blake3.blake3(seed + b"%d" % i).digest(length={block} if i < blocks else tail)
    w.write(block)
    if i + 1 == kill_after:
        print(json.dumps({{"before": before, "after": peak()}}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
w.commit({{"sop_uid": "1.2.3"}})
print(json.dumps({{"before": before, "after": peak()}}))
"""


def _object(seed: str, blocks: int, tail: int) -> bytes:
    return b"".join(blake3.blake3(seed.encode() + b"%d" % i).digest(length=BLOCK if i < blocks else tail)
                    for i in range(blocks + 1))


def _write_in_child(cluster, seed: str, blocks: int, tail: int, digest: str, kill_after: int = 0) -> dict:
    cfg = _backend(cluster).model_dump()
    res = subprocess.run([sys.executable, "-c", _CHILD.format(repo=str(REPO), block=BLOCK), json.dumps(cfg), seed,
                          str(blocks), str(tail), digest, str(kill_after)],
                         capture_output=True, text=True, timeout=300)
    if kill_after:
        assert res.returncode == -9, res.stderr
    else:
        assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_300_mib_object_streamed_by_a_process_has_puts_layout_and_costs_about_a_chunk(cluster):
    blocks, tail = 300, 12345
    data = _object("big", blocks, tail)
    digest = content_digest(data)
    peaks = _write_in_child(cluster, "big", blocks, tail, digest)
    grew_mib = (peaks["after"] - peaks["before"]) / 1024
    print(f"writer process peak RSS +{grew_mib:.1f} MiB for a {len(data) / 2**20:.0f} MiB object "
          f"in {CHUNK / 2**20:.1f} MiB chunks")
    # The first chunk, held while it may be the only one, then a few 4 MiB pieces in flight: never the object.
    assert grew_mib < CHUNK / 2**20 + 32, peaks

    store = RadosObjectStore("ceph", _backend(cluster))
    try:
        attrs = store.xattrs(digest)
        assert attrs["layout"] == LAYOUT_CHUNKED and attrs["size"] == str(len(data)) and attrs["sop_uid"] == "1.2.3"
        size, chunks = decode_manifest(store.io.read(digest, length=store.io.stat(digest)[0]), digest)
        planned = plan_chunks(digest, len(data), CHUNK)
        assert size == len(data)
        assert [(c.name, c.offset, c.size) for c in chunks] == [(c.name, c.offset, c.size) for c in planned]
        assert all(c.digest == content_digest(data[c.offset:c.offset + c.size]) for c in chunks)
        for c in chunks:  # each chunk as put writes it: its digest and the object it belongs to
            chunk_attrs = dict(store.io.get_xattrs(c.name))
            assert chunk_attrs["dicomflow.chunk_of"] == digest.encode()
        assert store.get(digest) == data
        for edge in (CHUNK, 2 * CHUNK, 17 * CHUNK):  # ranges across chunk boundaries
            assert store.read_range(digest, edge - 100, 300) == (data[edge - 100:edge + 200], len(data))
        assert store.read_range(digest, len(data) - 5, 100) == (data[-5:], len(data))
        assert digest in {o.digest for o in store.objects()}
        # The releaser's removal takes the head and every chunk.
        assert store.remove_unless_touched(digest, not_after=2**40)
        assert not store.exists(digest)
        for c in chunks:
            with pytest.raises(store.rados.ObjectNotFound):
                store.io.stat(c.name)
    finally:
        store.remove(digest)
        store.close()


def test_a_writer_killed_or_closed_before_commit_leaves_nothing_visible(cluster):
    blocks, tail = 60, 777
    data = _object("killed", blocks, tail)
    digest = content_digest(data)
    _write_in_child(cluster, "killed", blocks, tail, digest, kill_after=40)  # two chunks sent, then SIGKILL
    store = RadosObjectStore("ceph", _backend(cluster))
    try:
        assert not store.exists(digest) and digest not in {o.digest for o in store.objects()}
        with pytest.raises(ObjectMissing):
            store.get(digest)
        with pytest.raises(ObjectMissing):
            store.read_range(digest, 0, 10)
        store.io.stat(chunk_name(digest, 0))  # a leftover chunk no reader looks for, as a killed put's ...
        w = store.writer(10**9, digest)
        for i in range(0, len(data), 3 * BLOCK + 1):
            w.write(data[i:i + 3 * BLOCK + 1])
        assert w.commit() == digest  # ... overwritten by the retry
        assert store.get(digest) == data
        store.remove(digest)

        # Closed before commit: its chunks are removed, nothing is left.
        w = store.writer(10**9, digest)
        w.write(data[:3 * CHUNK])
        assert store.io.stat(chunk_name(digest, 0))[0] == CHUNK  # written as it filled
        w.close()
        assert not store.exists(digest)
        assert not list(store.object_names(digest))
    finally:
        store.remove(digest)
        store.close()


def test_bytes_that_do_not_match_the_digest_commit_nothing(cluster):
    data = _object("bad", 40, 1)
    digest = content_digest(data)
    store = RadosObjectStore("ceph", _backend(cluster))
    try:
        w = store.writer(10**9, digest)
        assert isinstance(w, RadosWriter)
        w.write(data[:-1] + b"\x00" if data[-1:] != b"\x00" else data[:-1] + b"\x01")
        with pytest.raises(CorruptObject, match="nothing committed"):
            w.commit()
        assert not store.exists(digest) and not list(store.object_names(digest))
    finally:
        store.close()


def test_a_small_object_is_written_whole_at_commit_and_a_stored_one_only_touched(cluster):
    store = RadosObjectStore("ceph", _backend(cluster))
    small = _object("small", 2, 100)
    big = _object("again", 20, 3)
    try:
        w = store.writer(10**9, content_digest(small))
        w.write(small)
        assert not store.exists(content_digest(small))  # nothing before commit
        w.commit()
        assert store.xattrs(content_digest(small))["layout"] == "whole" and store.get(content_digest(small)) == small
        # An object already stored: the writer only touches its head (as put does), bumping its version.
        store.put(content_digest(big), big)
        store.io.stat(content_digest(big))
        before = store.io.get_last_version()
        w = store.writer(10**9, content_digest(big))
        w.write(big)
        w.commit()
        store.io.stat(content_digest(big))
        assert store.io.get_last_version() > before and store.get(content_digest(big)) == big
    finally:
        store.remove(content_digest(small))
        store.remove(content_digest(big))
        store.close()


def test_the_store_streams_a_large_instance_from_staging_into_a_rados_placement(cluster, tmp_path):
    from services.store.storing import Storer
    from shared.catalogue.sqlite import open_sqlite
    from shared.config import Config
    from shared.storage.objectstore import Backends
    from tests.test_store_streaming import _event

    config = Config.model_validate({
        "data_dir": str(tmp_path), "store": {"stream_above_bytes": 2**20},
        "storage": {"staging": "stage",
                    "backends": {"stage": {"kind": "fs", "path": "stage"},
                                 "ceph": {"kind": "rados", "ceph_conf": str(cluster.conf), "pool": "objects",
                                          "op_timeout_s": 10, "chunk_bytes": CHUNK}},
                    "policies": {"default": {"placements": ["ceph"]}}, "default_policy": "default"}})
    backends = Backends(config)
    stage = backends.get("stage")
    bodies = [_object("placed-big", 40, 99), _object("placed-small", 0, 300_000), _object("placed-bad", 20, 1)]
    events = []
    for n, body in enumerate(bodies):
        stage.put(content_digest(body), body)
        events.append(_event(content_digest(body), len(body), n))
    with open(stage.path(events[2].digest), "r+b") as f:  # gone bad in staging, in its second chunk
        f.seek(CHUNK + 5)
        f.write(b"\xee" * 4)
    storer = Storer(config, None, backends, open_sqlite(tmp_path / "c.sqlite"))
    ceph = backends.get("ceph")
    try:
        errors = storer.place_many([(e, ["ceph"]) for e in events])
        assert errors[:2] == [None, None] and isinstance(errors[2], CorruptObject)
        assert ceph.xattrs(events[0].digest)["layout"] == LAYOUT_CHUNKED
        assert ceph.xattrs(events[0].digest)["sop_uid"] == "1.2.3.1.0"
        assert ceph.get(events[0].digest) == bodies[0] and ceph.get(events[1].digest) == bodies[1]
        assert not ceph.exists(events[2].digest) and not list(ceph.object_names(events[2].digest))
    finally:
        for e in events:
            ceph.remove(e.digest)
        backends.close()
