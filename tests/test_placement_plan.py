"""The store's placement plan (pure), and the storage interface every backend implements (on a real filesystem)."""

from __future__ import annotations

import pytest

from services.store.placement_plan import BackendPlan, Check, Copy, plan_placements
from shared.config import FsBackendConfig
from shared.storage.fs_store import FileObjectStore
from shared.storage.objectstore import Capability, ObjectMissing, ObjectStore, content_digest


def test_only_the_staging_backend_checks_and_every_other_copies_from_staging():
    plan = plan_placements([("stage", ["stage", "ceph"]), ("stage", ["ceph"])])
    assert plan == [BackendPlan("stage", (Check(0),)),
                    BackendPlan("ceph", (Copy(0, "stage", keep=False), Copy(1, "stage", keep=False)))]


def test_bytes_are_held_until_the_last_copy_and_no_longer():
    plan = plan_placements([("stage", ["a", "b", "c"]), ("stage", ["b"]), ("stage", ["a", "stage"])])
    assert plan == [
        BackendPlan("a", (Copy(0, "stage", keep=True), Copy(2, "stage", keep=False))),
        BackendPlan("b", (Copy(0, "stage", keep=True), Copy(1, "stage", keep=False))),
        BackendPlan("c", (Copy(0, "stage", keep=False),)),
        BackendPlan("stage", (Check(2),)),
    ]


def test_each_instance_is_copied_from_its_own_staging_backend():
    plan = plan_placements([("stage-1", ["archive"]), ("stage-2", ["archive", "stage-1"])])
    assert plan == [BackendPlan("archive", (Copy(0, "stage-1", keep=False), Copy(1, "stage-2", keep=True))),
                    BackendPlan("stage-1", (Copy(1, "stage-2", keep=False),))]


def test_a_placement_named_twice_is_written_once_and_drops_the_bytes():
    assert plan_placements([("stage", ["x", "x"])]) == [BackendPlan("x", (Copy(0, "stage", keep=False),))]


def test_an_empty_batch_plans_nothing():
    assert plan_placements([]) == []
    assert plan_placements([("stage", [])]) == []


def test_a_filesystem_backend_implements_the_whole_interface(tmp_path):
    store = FileObjectStore("local", FsBackendConfig(path=str(tmp_path / "objects")), tmp_path)
    try:
        assert isinstance(store, ObjectStore)
        assert Capability.STUDY_INDEX in store.capabilities  # its index files (shared/storage/fs_study_index.py)
        assert store.omap_set_many([("dicomflow.study.1.2", {"k": b"v"})]) == [None]
        assert store.omap_get("dicomflow.study.1.2") == {"k": b"v"}
        assert list(store.object_names("dicomflow.study.")) == ["dicomflow.study.1.2"]
        bodies = [f"object {i}".encode() * 100 for i in range(3)]

        def writes():
            yield from ((content_digest(b), b, {"n": str(i)}) for i, b in enumerate(bodies))
            yield "not a digest", b"x", None

        results = store.put_many(writes())
        assert results[:3] == [None, None, None] and isinstance(results[3], ValueError)
        assert [store.get(content_digest(b)) for b in bodies] == bodies
        store.remove(content_digest(bodies[0]))
        store.remove(content_digest(bodies[0]))  # removing what is gone is no error
        assert not store.exists(content_digest(bodies[0])) and store.exists(content_digest(bodies[1]))
        with pytest.raises(ObjectMissing):
            store.get(content_digest(bodies[0]))
    finally:
        store.close()


def test_an_instance_above_the_threshold_is_streamed_to_every_copy_and_never_held():
    plan = plan_placements([("stage", ["a", "b"]), ("stage", ["a", "b"]), ("stage", ["stage", "a"])],
                           [500_000, 64 * 2**20 + 1, 64 * 2**20 + 1], stream_above=64 * 2**20)
    assert plan == [
        BackendPlan("a", (Copy(0, "stage", keep=True), Copy(1, "stage", keep=False, stream=True),
                          Copy(2, "stage", keep=False, stream=True))),
        BackendPlan("b", (Copy(0, "stage", keep=False), Copy(1, "stage", keep=False, stream=True))),
        BackendPlan("stage", (Check(2),)),
    ]
    # at the threshold, and without sizes: today's batched copy
    assert plan_placements([("stage", ["a"])], [64 * 2**20], 64 * 2**20) == [BackendPlan("a", (Copy(0, "stage", keep=False),))]
    assert plan_placements([("stage", ["a"])]) == [BackendPlan("a", (Copy(0, "stage", keep=False),))]
