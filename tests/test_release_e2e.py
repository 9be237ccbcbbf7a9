"""Staging released, never early: ``dicomflow run`` with a staging backend apart from the placement, a real
storescp as the forward target, dcmtk's storescu as the modality, processes killed with SIGKILL."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from dicomflow.natsserver import free_port
from tests.chaos_harness import _ppid_and_argv, children
from tests.helpers import dataset_bytes, wait_for
from tests.router_harness import Cluster, Gateway, make_studies

RULES = """
rules:
  - name: everything-to-gw
    match: {}
    action: forward
    to: GW1
"""
DIGEST = re.compile(r"^[0-9a-f]{64}$")


def objects(root: Path) -> set[str]:
    """The digests of the objects of an fs backend."""
    return {f.name for f in root.glob("??/*") if DIGEST.match(f.name)}


def sections(tmp: Path, gw: Gateway) -> dict:
    (tmp / "rules.yaml").write_text(RULES)
    return {
        "storage": {"staging": "staging", "default_policy": "default",
                    "backends": {"staging": {"kind": "fs", "path": "staging"},
                                 "archive": {"kind": "fs", "path": "archive"}},
                    "policies": {"default": {"placements": ["archive"]}}},
        "release": {"interval_s": 0.5, "min_age_s": 3},
        "router": {"rules_file": str(tmp / "rules.yaml"), "targets": {"GW1": gw.target(timeout_s=5)},
                   "completion": {"quiet_s": 1}, "scan_interval_s": 0.2,
                   "forward": {"batch": 16, "backoff_initial_s": 0.2, "backoff_max_s": 1.0, "max_attempts": 1000,
                               "probe_interval_s": 0.5},
                   "group": {"ack_wait_s": 10, "pinned_timeout_s": 4, "member_ttl_s": 2, "heartbeat_s": 0.5}},
    }


def _expect_received(gw: Gateway, studies: dict[str, list[Path]]) -> None:
    files = [f for fs in studies.values() for f in fs]
    wait_for(lambda: len(gw.received()) == len(files), 120, interval=0.5, what="every instance at the gateway")
    got = gw.received()
    assert sorted(got.values()) == sorted(dataset_bytes(f) for f in files)


def test_study_stored_and_forwarded_leaves_nothing_staged(tmp_path, stack_factory):
    gw = Gateway(tmp_path, "GW1").start()
    try:
        stack = stack_factory(**sections(tmp_path, gw))
        studies = make_studies(tmp_path / "studies", 1, 6)
        (uid, files), = studies.items()
        staging, archive = stack.data_dir / "staging", stack.data_dir / "archive"
        assert stack.storescu(files[0].parent).returncode == 0
        assert len(objects(staging)) == 6  # the claim-checks, until the store and the router are done
        _expect_received(gw, studies)
        wait_for(lambda: stack.instances_of(uid) == 6, 60, what="the study catalogued")
        wait_for(lambda: not objects(staging), 30, interval=0.3, what="staging released")
        assert len(objects(archive)) == 6  # the stored copies stay
        report = json.loads(stack.cli("releaser", "--once", "--json").stdout)
        assert report["objects"] == 0 and report["bytes"] == 0 and report["blocked"] == ""
        # what is stored is still read back whole
        out = tmp_path / "export"
        stack.cli("export", "--study", uid, "--out", str(out))
        assert sorted(dataset_bytes(f) for f in out.rglob("*") if f.is_file()) == sorted(dataset_bytes(f)
                                                                                       for f in files)
    finally:
        gw.kill()


def test_target_down_keeps_the_studys_staged_bytes_until_it_is_delivered(tmp_path, stack_factory):
    gw = Gateway(tmp_path, "GW1", port=free_port())  # configured, not started: down
    stack = stack_factory(**sections(tmp_path, gw))
    studies = make_studies(tmp_path / "studies", 1, 5)
    (uid, files), = studies.items()
    staging = stack.data_dir / "staging"
    assert stack.storescu(files[0].parent).returncode == 0
    wait_for(lambda: stack.instances_of(uid) == 5, 60, what="the study catalogued")
    time.sleep(3 + 2)  # past the grace and several sweeps: only the forward jobs hold the bytes now
    assert len(objects(staging)) == 5
    report = json.loads(stack.cli("releaser", "--once", "--json").stdout)
    assert report["released"] == 0 and report["held"] == {"forward_job": 5}, report
    assert "stay staged (kept: forward_job 5)" in stack.cli("releaser", "--once").stdout
    gw.start()
    try:
        _expect_received(gw, studies)
        wait_for(lambda: not objects(staging), 30, interval=0.3, what="staging released once delivered")
    finally:
        gw.kill()


def test_a_study_deleted_while_its_forwards_wait_leaves_nothing_staged(tmp_path, stack_factory):
    """Deleted while its forward jobs wait for a target that is down: the stored copies go at once, the staged ones
    stay for the jobs, are delivered once the target is back, and then released - no placement holds them any
    more, but the deletion event names their digests."""
    gw = Gateway(tmp_path, "GW1", port=free_port())  # configured, not started: down
    stack = stack_factory(**sections(tmp_path, gw))
    studies = make_studies(tmp_path / "studies", 1, 4)
    (uid, files), = studies.items()
    staging, archive = stack.data_dir / "staging", stack.data_dir / "archive"
    assert stack.storescu(files[0].parent).returncode == 0
    wait_for(lambda: stack.instances_of(uid) == 4, 60, what="the study catalogued")
    assert stack.cli("delete", "--study", uid).returncode == 0
    assert not objects(archive) and len(objects(staging)) == 4
    gw.start()
    try:
        _expect_received(gw, studies)
        wait_for(lambda: not objects(staging), 30, interval=0.3, what="the deleted study's staged copies released")
    finally:
        gw.kill()


def test_staging_that_is_the_placement_is_never_released(tmp_path, stack_factory):
    stack = stack_factory(release={"interval_s": 0.5, "min_age_s": 3})  # the default: staging "local" is the placement
    studies = make_studies(tmp_path / "studies", 1, 3)
    (uid, files), = studies.items()
    assert stack.storescu(files[0].parent).returncode == 0
    wait_for(lambda: stack.instances_of(uid) == 3, 60, what="the study catalogued")
    report = json.loads(stack.cli("releaser", "--once", "--json").stdout)
    assert report["released"] == 0 and report["objects"] == 3 and "is a placement of policy 'default'" in report["blocked"]


def _kind(argv: list[str]) -> str | None:
    for kind in ("store", "router", "releaser"):
        if "dicomflow" in argv and kind in argv:
            return kind
    return None


def _killer(run_pid: int, seed: int, stop: threading.Event, killed: list[str]) -> None:
    """SIGKILL a store worker, the router or the releaser at moments drawn from ``seed``."""
    rnd = random.Random(seed)
    while not stop.wait(rnd.uniform(0.5, 2.5)):
        procs = [(pid, k) for pid in children(run_pid) if (info := _ppid_and_argv(pid)) and (k := _kind(info[1]))]
        if not procs:
            continue
        pid, kind = rnd.choice(procs)
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(kind)
        except ProcessLookupError:
            pass


def test_kill_9_of_store_router_and_releaser_never_loses_needed_bytes_and_leaves_nothing(tmp_path, stack_factory):
    gw = Gateway(tmp_path, "GW1").start()
    try:
        tree = sections(tmp_path, gw)
        tree["release"] = {"interval_s": 0.2, "min_age_s": 2.5}
        stack = stack_factory(store={"workers": 2}, **tree)
        studies = make_studies(tmp_path / "studies", 4, 8)
        stop, killed = threading.Event(), []
        killer = threading.Thread(target=_killer, args=(stack.proc.pid, 19, stop, killed), daemon=True)
        killer.start()
        try:
            for files in studies.values():
                assert stack.storescu(files[0].parent).returncode == 0
                time.sleep(1.5)  # kills land between, during and after the studies
            time.sleep(4)
        finally:
            stop.set()
            killer.join()
        assert {"store", "router", "releaser"} & set(killed), killed
        for uid, files in studies.items():
            wait_for(lambda u=uid, n=len(files): stack.instances_of(u) == n, 120, interval=0.5,
                     what=f"study {uid} catalogued whole")
        _expect_received(gw, studies)
        staging = stack.data_dir / "staging"
        wait_for(lambda: not objects(staging), 60, interval=0.5, what="staging empty once all is done")
        assert not list(staging.glob("??/*.releasing"))
        assert len(objects(stack.data_dir / "archive")) == sum(len(f) for f in studies.values())
        log = stack.log.read_text()
        # every forward read its bytes from staging: none was released while a job still named it
        assert "no longer staged" not in log and "dead-lettered" not in log, killed
    finally:
        gw.kill()


@pytest.fixture(scope="module")
def ceph(tmp_path_factory):
    from tests.ceph_cluster import CephCluster

    c = CephCluster(tmp_path_factory.mktemp("ceph") / "c", osds=3, op_timeout_s=10).start()
    c.create_pool("staging")
    yield c
    c.stop()


def _rados_staged(ceph) -> set[str]:
    from shared.config import RadosBackendConfig
    from shared.storage.rados_store import RadosObjectStore

    s = RadosObjectStore("staging", RadosBackendConfig(ceph_conf=str(ceph.conf), pool="staging", op_timeout_s=10))
    try:
        return {o.digest for o in s.objects()}
    finally:
        s.close()


@pytest.mark.ceph
def test_services_one_by_one_with_a_rados_staging_pool(tmp_path, nats_server, ceph):
    gw = Gateway(tmp_path, "GW1").start()
    c = Cluster(tmp_path, nats_server.url, {"targets": {"GW1": gw.target(timeout_s=5)},
                                            "completion": {"quiet_s": 1}}, RULES)
    c.tree["storage"] = {"staging": "staging", "default_policy": "default",
                         "backends": {"staging": {"kind": "rados", "ceph_conf": str(ceph.conf), "pool": "staging",
                                                  "op_timeout_s": 10},
                                      "archive": {"kind": "fs", "path": "archive"}},
                         "policies": {"default": {"placements": ["archive"]}}}
    c.tree["release"] = {"interval_s": 0.5, "min_age_s": 3}
    c.write()
    try:
        c.start_ingest()
        c._spawn("store", "store")
        c.start_router()
        releaser = c._spawn("releaser", "releaser")
        first, second = make_studies(tmp_path / "studies", 2, 4).items()
        c.send([first[1][0].parent])
        _expect_received(gw, dict([first]))
        wait_for(lambda: not _rados_staged(ceph), 60, interval=0.5, what="the rados staging pool emptied")
        gw.kill()
        c.send([second[1][0].parent])
        c.kill(releaser)  # kill -9, then a new one: it starts from the streams again
        releaser = c._spawn("releaser", "releaser")
        time.sleep(3 + 3)
        assert len(_rados_staged(ceph)) == 4, c.logs()  # the target is down: its jobs hold the bytes
        gw.start()
        _expect_received(gw, dict([first, second]))
        wait_for(lambda: not _rados_staged(ceph), 60, interval=0.5, what="released once delivered")
        assert len(objects(Path(c.tree["data_dir"]) / "archive")) == 8
    finally:
        c.stop()
        gw.kill()


def test_on_complete_forward_after_release_reads_the_stored_copy(tmp_path, stack_factory):
    """A job made after its instance's staged copy went (a `when: complete` rule whose study completes after the
    grace) sends the stored copy, byte-identical."""
    gw = Gateway(tmp_path, "GW1").start()
    try:
        tree = sections(tmp_path, gw)
        (tmp_path / "rules.yaml").write_text("rules:\n  - {name: all, match: {}, action: forward, to: GW1, "
                                             "when: complete}\n")
        tree["release"] = {"interval_s": 0.3, "min_age_s": 2.5}
        tree["router"]["completion"] = {"quiet_s": 10}
        stack = stack_factory(**tree)
        studies = make_studies(tmp_path / "studies", 1, 4)
        (uid, files), = studies.items()
        assert stack.storescu(files[0].parent).returncode == 0
        wait_for(lambda: not objects(stack.data_dir / "staging"), 30, interval=0.3,
                 what="staging released before the study completes")
        assert not gw.received()
        _expect_received(gw, studies)
        assert "no longer staged" in stack.log.read_text()
    finally:
        gw.kill()
