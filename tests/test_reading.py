"""Reading a stored object back: the first placement that holds it, chunked, verified before the last chunk."""

from __future__ import annotations

import pytest

from shared.config import load_config
from shared.storage.objectstore import Backends, CorruptObject, content_digest
from shared.storage.reading import Unavailable, open_verified


@pytest.fixture()
def backends(tmp_path):
    cfg = load_config(None, environ={}, overrides={"data_dir": str(tmp_path), "storage": {"backends": {
        "local": {"kind": "fs", "path": "a"}, "b": {"kind": "fs", "path": "b"}}}})
    opened = Backends(cfg)
    yield opened
    opened.close()


def test_the_first_placement_that_holds_it_is_read_in_chunks(backends):
    data = bytes(range(256)) * 41  # 10,496 bytes: 11 chunks of 1,000
    digest = content_digest(data)
    backends.get("b").put(digest, data)
    size, chunks = open_verified(backends, digest, ["local", "b"], chunk=1000)
    parts = list(chunks)
    assert size == len(data) and b"".join(p for p, _ in parts) == data
    assert [last for _, last in parts] == [False] * 10 + [True]


def test_an_object_of_one_chunk_is_read_once(backends):
    data = b"one chunk" * 10
    digest = content_digest(data)
    backends.get("local").put(digest, data)
    size, chunks = open_verified(backends, digest, ["local"])
    assert list(chunks) == [(data, True)] and size == len(data)


def test_a_corrupt_object_never_yields_its_last_chunk(backends, tmp_path):
    data = b"x" * 5000
    digest = content_digest(data)
    store = backends.get("local")
    store.put(digest, data)
    store.close()  # checkpointed: the object is a plain file now
    with open(store.path(digest), "r+b") as f:
        f.seek(4500)
        f.write(b"y")
    _, chunks = open_verified(backends, digest, ["local"], chunk=1000)
    got = []
    with pytest.raises(CorruptObject):
        for part in chunks:
            got.append(part)
    assert len(got) == 4 and not any(last for _, last in got)


def test_no_placement_holding_it_is_unavailable(backends):
    with pytest.raises(Unavailable):
        open_verified(backends, content_digest(b"never stored"), ["local", "b"])


def test_fs_ranges_are_what_the_object_holds(backends):
    data = bytes(range(256)) * 8
    digest = content_digest(data)
    store = backends.get("local")
    store.put(digest, data)
    assert store.read_range(digest, 0, 1 << 20) == (data, len(data))  # more asked than there is: all of it
    assert store.read_range(digest, 0, 0) == (b"", len(data))  # the size alone
    assert store.read_range(digest, 2040, 100) == (data[2040:], len(data))
    assert store.read_range(digest, len(data), 10) == (b"", len(data))
    assert store.read_range(digest, len(data) + 5, 10) == (b"", len(data))
