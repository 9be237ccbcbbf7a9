"""The router against real parts: nats-server, the ingest, router processes, dcmtk storescp gateways.

Every study must arrive whole at exactly one gateway, byte-identical, while gateways die, come
back and join; study.complete fires once per study even when a router member dies.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
from pydicom import dcmread

from services.router.assignment import choose
from shared.contract.uids import uid_token
from tests.helpers import REPO, dataset_bytes, wait_for
from tests.router_harness import (
    Cluster,
    Gateway,
    assigned,
    events_on,
    last_event,
    make_studies,
    split_folder,
    study_state,
    target_up,
    where,
)

STREAM_RULES = """
rules:
  - name: ct-to-gateways
    match: {Modality: CT}
    action: forward
    to: gateways
"""


def _sops(studies):
    return {f: dcmread(f, stop_before_pixels=True).SOPInstanceUID for files in studies.values() for f in files}


def _assert_whole_and_identical(gateways, studies, sop_of):
    placed = where(gateways, studies, sop_of)
    by_name = {g.name: g.received() for g in gateways}
    for uid, files in studies.items():
        assert len(placed[uid]) == 1, f"study {uid} split or missing: {placed[uid]}"
        (home, n), = placed[uid].items()
        assert n == len(files), f"study {uid}: {n} of {len(files)} at {home}"
        for f in files:
            assert by_name[home][sop_of[f]] == dataset_bytes(f), f"{f.name} differs at {home}"
    return {uid: next(iter(p)) for uid, p in placed.items()}


@pytest.fixture
def cluster_factory(tmp_path, nats_server):
    made = []

    def make(router: dict, rules: str = STREAM_RULES) -> Cluster:
        c = Cluster(tmp_path, nats_server.url, router, rules)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


@pytest.fixture
def gateways(tmp_path):
    made: list[Gateway] = []

    def make(*names: str) -> list[Gateway]:
        gws = [Gateway(tmp_path, n).start() for n in names]
        made.extend(gws)
        return gws

    yield make
    for g in made:
        g.kill()


def _group(gws, weights=None, **kw):
    return {"targets": {g.name: g.target() for g in gws},
            "groups": {"gateways": {"members": {g.name: (weights or {}).get(g.name, 1.0) for g in gws}, **kw}}}


def test_thirty_studies_whole_at_one_gateway_each_balanced_and_complete_once(tmp_path, cluster_factory, gateways):
    gws = gateways("GW1", "GW2", "GW3")
    weights = {"GW1": 2.0, "GW2": 1.0, "GW3": 1.0}
    # Pure weighted rendezvous (load_bound 0) so every study's gateway is predictable; the bounded
    # default depends on which studies are open at the time (unit tests and bench/balance.py cover it).
    cluster = cluster_factory(_group(gws, weights, load_bound=0))
    cluster.start_ingest()
    cluster.start_router()
    cluster.start_router()  # two members: completion must still be announced once per study
    studies = make_studies(tmp_path / "studies", 30, 3)
    sop_of = _sops(studies)
    cluster.send([files[0].parent for files in studies.values()])
    total = sum(len(f) for f in studies.values())
    try:
        wait_for(lambda: sum(len(g.received()) for g in gws) >= total, 120, interval=0.5, what="every instance forwarded")
        homes = _assert_whole_and_identical(gws, studies, sop_of)
        assert homes == {uid: choose(uid, weights) for uid in studies}
        # Weighted 2:1:1: about 15/7.5/7.5 of 30 (bounds at ~3 standard deviations of the binomial).
        counts = {g.name: sum(1 for h in homes.values() if h == g.name) for g in gws}
        assert 7 <= counts["GW1"] <= 23 and all(1 <= counts[n] <= 15 for n in ("GW2", "GW3")), counts
        wait_for(lambda: events_on(cluster.nats_url, "dicom.study.complete.>") >= 30, 60, interval=0.5,
                 what="a study.complete per study")
    except AssertionError:
        print(cluster.logs())
        raise
    for uid in studies:
        assert events_on(cluster.nats_url, f"dicom.study.complete.{uid_token(uid)}") == 1
        assert events_on(cluster.nats_url, f"dicom.study.routed.{uid_token(uid)}") == 1
    assert events_on(cluster.nats_url, "dicom.study.updated.>") == 0


def test_gateway_killed_mid_run_and_restarted_nothing_split_nothing_lost(tmp_path, cluster_factory, gateways):
    gws = gateways("GW1", "GW2", "GW3")
    cluster = cluster_factory(_group(gws))
    cluster.start_ingest()
    cluster.start_router()
    studies = make_studies(tmp_path / "studies", 12, 4)
    sop_of = _sops(studies)
    pieces = {uid: split_folder(files, tmp_path / "pieces" / uid_token(uid), 2) for uid, files in studies.items()}
    first = [p[0] for p in pieces.values()]
    early = dict(list(studies.items())[:6])
    cluster.send(first[:6])
    wait_for(lambda: sum(len(g.received()) for g in gws) >= 12, 60, interval=0.3, what="first halves forwarded")
    before = {uid: next(iter(p)) for uid, p in where(gws, early, sop_of).items()}
    # The victim is the gateway holding the most started studies; it dies with half of each sent.
    victim = max(gws, key=lambda g: sum(1 for h in before.values() if h == g.name))
    victim.kill()
    wait_for(lambda: target_up(cluster.nats_url, victim.name) is False, 30, what="the victim marked down")
    cluster.send(first[6:])
    cluster.send([p[1] for p in pieces.values()])
    total = sum(len(f) for f in studies.values())
    waiting = [uid for uid, h in before.items() if h == victim.name]
    try:
        # While it is down its studies wait (nothing of them goes elsewhere) and the other studies complete.
        wait_for(lambda: len(assigned(cluster.nats_url)) == len(studies), 60, what="every study assigned")
        homes_now = assigned(cluster.nats_url)
        live = [uid for uid, h in homes_now.items() if h != victim.name]
        wait_for(lambda: all(where(gws, studies, sop_of)[uid] == {homes_now[uid]: 4} for uid in live), 90,
                 interval=0.5, what="the live gateways' studies whole")
        placed = where(gws, studies, sop_of)
        for uid in [u for u, h in homes_now.items() if h == victim.name]:
            assert set(placed[uid]) <= {victim.name}, placed[uid]
        assert all(homes_now[uid] == victim.name for uid in waiting)
        # New studies skipped the down gateway.
        assert all(homes_now[uid] != victim.name for uid in list(studies)[6:])
        victim.start()  # same port, same folder
        wait_for(lambda: sum(len(g.received()) for g in gws) >= total, 120, interval=0.5, what="every instance")
        homes = _assert_whole_and_identical(gws, studies, sop_of)
    except AssertionError:
        print(cluster.logs())
        raise
    # Every started study finished where it started, through the outage.
    assert {uid: homes[uid] for uid in before} == before


def test_reassign_moves_a_study_whole_off_a_dead_gateway(tmp_path, cluster_factory, gateways):
    gws = gateways("GW1", "GW2", "GW3")
    cluster = cluster_factory(_group(gws, on_member_down="reassign", load_bound=0))
    cluster.start_ingest()
    cluster.start_router()
    members = {g.name: 1.0 for g in gws}
    studies = make_studies(tmp_path / "studies", 3, 4, pick=lambda uid: choose(uid, members) == "GW1")
    sop_of = _sops(studies)
    pieces = {uid: split_folder(files, tmp_path / "pieces" / uid_token(uid), 2) for uid, files in studies.items()}
    cluster.send([p[0] for p in pieces.values()])
    wait_for(lambda: len(gws[0].received()) >= 6, 60, what="first halves at GW1")
    gws[0].kill()
    cluster.send([p[1] for p in pieces.values()])
    try:
        wait_for(lambda: all(sum(v for k, v in where(gws, studies, sop_of)[uid].items() if k != "GW1") == 4
                             for uid in studies), 90, interval=0.5, what="studies moved whole to live gateways")
    except AssertionError:
        print(cluster.logs())
        raise
    placed = where(gws, studies, sop_of)
    for uid in studies:
        moved_to = [k for k in placed[uid] if k != "GW1"]
        assert len(moved_to) == 1, placed[uid]  # whole, at one new gateway, not spread
        assert events_on(cluster.nats_url, f"dicom.study.routed.{uid_token(uid)}") == 2  # first choice + the move


def test_fourth_gateway_added_mid_run_in_flight_studies_stay_new_ones_spread(tmp_path, cluster_factory, gateways):
    gws = gateways("GW1", "GW2", "GW3")
    gw4 = Gateway(tmp_path, "GW4").start()
    three = {g.name: 1.0 for g in gws}
    four = {**three, "GW4": 1.0}
    try:
        cluster = cluster_factory({**_group(gws, load_bound=0), "completion": {"quiet_s": 30}})
        cluster.start_ingest()
        cluster.start_router()
        # In flight: studies that GW4 would win once it joins - they must stay where they started.
        inflight = make_studies(tmp_path / "inflight", 4, 4, pick=lambda uid: choose(uid, four) == "GW4")
        fresh = make_studies(tmp_path / "fresh", 6, 2)
        fresh.update(make_studies(tmp_path / "fresh4", 2, 2, pick=lambda u: choose(u, four) == "GW4"))
        everything = {**inflight, **fresh}
        sop_of = _sops(everything)
        pieces = {uid: split_folder(files, tmp_path / "pieces" / uid_token(uid), 2) for uid, files in inflight.items()}
        cluster.send([p[0] for p in pieces.values()])
        wait_for(lambda: sum(len(g.received()) for g in gws) >= 8, 60, what="first halves forwarded")
        started = {uid: next(iter(p)) for uid, p in where(gws, inflight, sop_of).items()}
        cluster.tree["router"]["targets"]["GW4"] = gw4.target()
        cluster.tree["router"]["groups"]["gateways"]["members"]["GW4"] = 1.0
        cluster.write()
        wait_for(lambda: "reloaded" in (tmp_path / "router-0.log").read_text(), 30, what="the router reloaded")
        cluster.send([p[1] for p in pieces.values()] + [files[0].parent for files in fresh.values()])
        all_gws = [*gws, gw4]
        total = sum(len(f) for f in everything.values())
        try:
            wait_for(lambda: sum(len(g.received()) for g in all_gws) >= total, 90, interval=0.5, what="everything")
            homes = _assert_whole_and_identical(all_gws, everything, sop_of)
        except AssertionError:
            print(cluster.logs())
            raise
        # In flight: still where they started, although GW4 is now their first choice.
        assert {uid: homes[uid] for uid in inflight} == started == {uid: choose(uid, three) for uid in inflight}
        # New studies: spread over four by the pure core's choice, GW4 among them.
        assert {uid: homes[uid] for uid in fresh} == {uid: choose(uid, four) for uid in fresh}
        assert "GW4" in {homes[uid] for uid in fresh}
    finally:
        gw4.kill()


ON_COMPLETE_RULES = """
rules:
  - name: whole-study
    action: forward
    to: ARCHIVE
    when: complete
"""


def test_router_killed_in_quiet_period_complete_fires_once_and_study_forwarded(tmp_path, cluster_factory, gateways):
    archive, = gateways("ARCHIVE")
    cluster = cluster_factory({"targets": {"ARCHIVE": archive.target()}, "completion": {"quiet_s": 4.0}},
                              ON_COMPLETE_RULES)
    cluster.start_ingest()
    first = cluster.start_router()
    studies = make_studies(tmp_path / "studies", 1, 5)
    (uid, files), = studies.items()
    sop_of = _sops(studies)
    cluster.send([files[0].parent])
    wait_for(lambda: (study_state(cluster.nats_url, uid) or {}).get("count") == 5, 30, interval=0.05,
             what="the study's state with 5 instances")
    cluster.kill(first)  # in the quiet period: nothing announced, nothing forwarded yet
    assert events_on(cluster.nats_url, "dicom.study.complete.>") == 0
    assert archive.received() == {}
    cluster.start_router()
    cluster.start_router()
    try:
        wait_for(lambda: len(archive.received()) == 5, 60, interval=0.3, what="the study forwarded on completion")
        _assert_whole_and_identical([archive], studies, sop_of)
        wait_for(lambda: events_on(cluster.nats_url, "dicom.study.complete.>") >= 1, 30, what="study.complete")
    except AssertionError:
        print(cluster.logs())
        raise
    wait_for(lambda: (study_state(cluster.nats_url, uid) or {}).get("completed_gen") == 1, 30, what="gen 1 done")
    assert events_on(cluster.nats_url, f"dicom.study.complete.{uid_token(uid)}") == 1
    complete = last_event(cluster.nats_url, f"dicom.study.complete.{uid_token(uid)}")
    assert (complete["generation"], complete["instances"], complete["reason"]) == (1, 5, "quiet")
    assert [(x["instances"], x["description"]) for x in complete["series"]] == [(5, "AXIAL")]
    assert complete["calling_ae"] == "MODALITY" and complete["institution_name"] == "General Hospital"
    # An instance arriving after completion re-opens the study: one study.updated, forwarded too.
    extra, = make_studies(tmp_path / "extra", 1, 1).values()
    from dicomflow.synthetic import ct_instance
    ds = ct_instance(uid, dcmread(files[0]).SeriesInstanceUID, 99, 16, 16)
    late = tmp_path / "late"
    late.mkdir()
    ds.save_as(late / "late.dcm", enforce_file_format=True)
    cluster.send([late])
    wait_for(lambda: events_on(cluster.nats_url, f"dicom.study.updated.{uid_token(uid)}") == 1, 30,
             what="study.updated")
    wait_for(lambda: len(archive.received()) == 6, 30, what="the late instance forwarded")
    updated = last_event(cluster.nats_url, f"dicom.study.updated.{uid_token(uid)}")
    assert (updated["generation"], updated["instances"]) == (2, 6)
    assert events_on(cluster.nats_url, f"dicom.study.complete.{uid_token(uid)}") == 1


class _Silent:
    """A peer that accepts connections and never answers: a send to it hangs until the target's timeout."""

    def __init__(self, port: int):
        self.sock = socket.create_server(("127.0.0.1", port))
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.sock.accept()[0])

    def close(self) -> None:
        for c in [*self.accepted, self.sock]:
            c.close()


def test_router_killed_while_sending_its_jobs_go_out_after_the_short_ack_wait(tmp_path, cluster_factory):
    """The jobs a router held when it was killed mid-send wait the group's ack wait (10 s here, kept alive by
    in-progress acks while a send runs), not the longest send: with the 60 s target timeout the old queue's
    ack wait was 180 s, longer than the chaos suite's settle time, and a forward looked lost."""
    archive = Gateway(tmp_path, "ARCHIVE")
    silent = _Silent(archive.port)
    cluster = cluster_factory({"targets": {"ARCHIVE": {**archive.target(), "timeout_s": 60}}},
                              "rules:\n  - {name: all, action: forward, to: ARCHIVE}\n")
    cluster.start_ingest()
    first = cluster.start_router()
    studies = make_studies(tmp_path / "studies", 1, 3)
    (uid, files), = studies.items()
    sop_of = _sops(studies)
    try:
        cluster.send([files[0].parent])
        wait_for(lambda: silent.accepted, 30, interval=0.1, what="the router sending to the silent peer")
        time.sleep(4)  # past an in-progress ack: the send held its jobs beyond a third of the ack wait
        cluster.kill(first)
        killed_at = time.monotonic()
        silent.close()
        archive.start()
        cluster.start_router()
        wait_for(lambda: len(archive.received()) == 3, 60, interval=0.3, what="the held jobs forwarded")
    except AssertionError:
        print(cluster.logs())
        raise
    finally:
        silent.close()
        archive.kill()
    waited = time.monotonic() - killed_at
    assert waited < 40, f"the killed router's jobs waited {waited:.0f} s"
    _assert_whole_and_identical([archive], studies, sop_of)


def test_dead_letters_listed_and_replayed(tmp_path, cluster_factory, gateways):
    down = Gateway(tmp_path, "DOWN")  # not started: its port refuses
    rules = ("rules:\n  - {name: suspect, match: {calling_ae: SUSPECT}, action: quarantine}\n"
             "  - {name: all, action: forward, to: DOWN}\n")
    cluster = cluster_factory({"targets": {"DOWN": down.target()},
                               "forward": {"batch": 16, "backoff_initial_s": 0.1, "backoff_max_s": 0.2,
                                           "max_attempts": 2, "probe_interval_s": 0.5}}, rules)
    cluster.start_ingest()
    cluster.start_router()
    studies = make_studies(tmp_path / "studies", 1, 3)
    (uid, files), = studies.items()
    cluster.send([files[0].parent])
    held = make_studies(tmp_path / "held", 1, 1)
    (held_uid, held_files), = held.items()
    cluster.send([held_files[0].parent], calling_ae="SUSPECT")

    def cli(*args):
        res = subprocess.run([sys.executable, "-m", "dicomflow", "--config", str(cluster.config_path), *args],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout

    try:
        wait_for(lambda: len(json.loads(cli("dlq", "list", "--json"))) == 4, 60, interval=0.5,
                 what="3 dead letters and 1 quarantined")
    except AssertionError:
        print(cluster.logs())
        raise
    rows = json.loads(cli("dlq", "list", "--json", "--study", uid))
    assert {r["target"] for r in rows} == {"DOWN"} and all(r["attempts"] == 2 for r in rows)
    assert events_on(cluster.nats_url, "dicom.forward.failed.DOWN.>") == 3
    quarantined = json.loads(cli("dlq", "list", "--json", "--target", "_quarantine"))
    assert [(r["study_uid"], r["attempts"]) for r in quarantined] == [(held_uid, 0)]
    assert "quarantined by rule 'suspect'" in quarantined[0]["reason"]
    down.start()
    try:
        replayed = json.loads(cli("dlq", "replay", "--json", "--target", "DOWN"))
        assert [r["replayed_to"] for r in replayed] == ["DOWN"] * 3
        wait_for(lambda: len(down.received()) == 3, 60, interval=0.3, what="replayed instances delivered")
        _assert_whole_and_identical([down], studies, _sops(studies))
        # A quarantined instance has no target of its own: it is released to one named explicitly.
        skipped = json.loads(cli("dlq", "replay", "--json", "--target", "_quarantine"))
        assert "use --to" in skipped[0]["skipped"]
        released = json.loads(cli("dlq", "replay", "--json", "--target", "_quarantine", "--to", "DOWN"))
        assert [r["replayed_to"] for r in released] == ["DOWN"]
        wait_for(lambda: len(down.received()) == 4, 60, interval=0.3, what="the released instance delivered")
        assert json.loads(cli("dlq", "list", "--json")) == []
        # each replay is in the audit trail: who replayed what to where
        replays = json.loads(cli("audit", "--json", "--event", "dlq-replay"))
        assert [(r["detail"]["target"], r["detail"]["replayed"], r["detail"]["skipped"], r["outcome"])
                for r in replays] == [("DOWN", "3", "0", "success"), ("-", "0", "1", "serious-failure"),
                                      ("DOWN", "1", "0", "success")]
        assert [s["study_uid"] for s in replays[0]["studies"]] == [uid]
        assert [s["study_uid"] for s in replays[2]["studies"]] == [held_uid]
        # a configuration the router re-reads is audited: applied with its new digest, or refused and why
        cluster.tree["router"]["forward"]["max_attempts"] = 5
        cluster.write()
        wait_for(lambda: json.loads(cli("audit", "--json", "--event", "configuration-change")), 30,
                 what="the reload audited")
        cluster.rules_path.write_text("rules: [{name: broken, action: teleport}]\n")
        wait_for(lambda: len(json.loads(cli("audit", "--json", "--event", "configuration-change"))) == 2, 30,
                 what="the refused reload audited")
        applied, refused = json.loads(cli("audit", "--json", "--event", "configuration-change"))
        assert applied["outcome"] == "success" and applied["detail"]["applied"] == "true"
        assert applied["detail"]["configuration_sha256"] != applied["detail"]["previous_sha256"]
        assert refused["outcome"] == "minor-failure" and refused["outcome_description"].startswith("not applied")
        assert refused["detail"]["configuration_sha256"] == applied["detail"]["configuration_sha256"]  # kept
    finally:
        down.kill()


def test_dicomflow_run_starts_the_router_when_rules_are_configured(tmp_path, nats_server, stack_factory, gateways):
    gw, = gateways("GW1")
    (tmp_path / "rules.yaml").write_text(STREAM_RULES)
    stack = stack_factory(nats_server.url, router={"rules_file": str(tmp_path / "rules.yaml"),
                                                   "targets": {"GW1": gw.target()},
                                                   "groups": {"gateways": {"members": {"GW1": 1}}},
                                                   "completion": {"quiet_s": 1}})
    studies = make_studies(tmp_path / "studies", 1, 3)
    (uid, files), = studies.items()
    assert stack.storescu(files[0].parent).returncode == 0
    wait_for(lambda: len(gw.received()) == 3, 60, interval=0.3, what="the study at the gateway")
    _assert_whole_and_identical([gw], studies, _sops(studies))
    wait_for(lambda: stack.instances_of(uid) == 3, 60, what="the study stored as well")
    wait_for(lambda: events_on(nats_server.url, f"dicom.study.complete.{uid_token(uid)}") == 1, 30,
             what="study.complete")


def test_stow_rs_target_receives_the_study_byte_identical(tmp_path, cluster_factory):
    from tests.router_harness import StowReceiver

    stow = StowReceiver()
    try:
        rules = "rules:\n  - name: web\n    match: {Modality: CT}\n    action: forward\n    to: WEB\n"
        cluster = cluster_factory({"targets": {"WEB": {"kind": "dicomweb", "url": stow.url, "timeout_s": 20}}}, rules)
        cluster.start_ingest()
        cluster.start_router()
        studies = make_studies(tmp_path / "studies", 1, 4)
        (uid, files), = studies.items()
        cluster.send([files[0].parent])
        sop_of = _sops(studies)
        wait_for(lambda: len(stow.received) == 4, 60, interval=0.3, what="4 instances over STOW-RS")
        assert {sop_of[f]: dataset_bytes(f) for f in files} == stow.received
        wait_for(lambda: events_on(cluster.nats_url, f"dicom.study.routed.{uid_token(uid)}") == 1, 30,
                 what="study.routed")
    finally:
        stow.close()


def test_member_removed_from_group_study_moves_whole(tmp_path, cluster_factory, gateways):
    gws = gateways("GW1", "GW2")
    cluster = cluster_factory({**_group(gws, load_bound=0), "completion": {"quiet_s": 30}})
    cluster.start_ingest()
    cluster.start_router()
    studies = make_studies(tmp_path / "studies", 1, 4, pick=lambda uid: choose(uid, {"GW1": 1, "GW2": 1}) == "GW1")
    (uid, files), = studies.items()
    sop_of = _sops(studies)
    first, second = split_folder(files, tmp_path / "pieces", 2)
    cluster.send([first])
    wait_for(lambda: len(gws[0].received()) == 2, 60, what="first half at GW1")
    del cluster.tree["router"]["groups"]["gateways"]["members"]["GW1"]  # GW1 stays a target, leaves the group
    cluster.write()
    wait_for(lambda: "reloaded" in (tmp_path / "router-0.log").read_text(), 30, what="the router reloaded")
    cluster.send([second])
    try:
        wait_for(lambda: where(gws, studies, sop_of)[uid].get("GW2") == 4, 60, interval=0.3, what="whole at GW2")
    except AssertionError:
        print(cluster.logs())
        raise
    _assert_whole_and_identical([gws[1]], studies, sop_of)
    assert assigned(cluster.nats_url) == {uid: "GW2"}
