"""The change feed end to end: instances sent with storescu, studies completed by the router, then read back over
HTTP (GET /changefeed, /changefeed/latest, as each tenant and as an administrator) and with `dicomflow events`
(--since a sequence or a time, --tenant, --json, --follow), against `dicomflow run` on a real nats-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import nats
import pytest
from pydicom import dcmread

from dicomflow.natsserver import free_port
from dicomflow.synthetic import write_study
from shared.bus.jetstream import api
from shared.contract.subjects import CHANGES_STREAM
from shared.tenancy import api_key_hash
from tests.helpers import REPO, run_async, wait_for

KEY_A, KEY_B, ADMIN = "hospital-a-key-123456", "clinic-b-key-654321", "admin-key-000000000"


@pytest.fixture
def stack(stack_factory, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")  # no forwarding: the router runs for study completion only
    return stack_factory(
        web={"port": free_port()},
        router={"rules_file": str(rules), "completion": {"quiet_s": 1}},
        changefeed={"max_age_days": 400, "max_limit": 50},
        access={"default_tenant": None, "anonymous_tenant": None, "admin_api_keys_sha256": [api_key_hash(ADMIN)],
                "tenants": {"a": {"aes": ["CT_A"], "api_keys_sha256": [api_key_hash(KEY_A)]},
                            "b": {"aes": ["CT_B"], "api_keys_sha256": [api_key_hash(KEY_B)]}}})


def get(stack, path: str, key: str | None) -> tuple[int, object]:
    url = f"http://127.0.0.1:{stack.tree['web']['port']}/dicom-web{path}"
    req = urllib.request.Request(url, headers={"X-API-Key": key} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def feed(stack, key: str, query: str = "") -> list[dict]:
    status, body = get(stack, f"/changefeed{query}", key)
    assert status == 200, body
    return body


def kinds(entries: list[dict]) -> list[tuple[str, str | None]]:
    return [(e["Kind"], e["SopInstanceUid"]) for e in entries]


def test_the_change_feed_over_http_and_the_cli(stack, tmp_path):
    study_a, files_a = write_study(tmp_path / "a", 3)
    sops_a = [dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files_a]
    assert stack.storescu(tmp_path / "a", calling_ae="CT_A").returncode == 0
    study_b, files_b = write_study(tmp_path / "b", 2)
    assert stack.storescu(tmp_path / "b", calling_ae="CT_B").returncode == 0
    # 5 instances stored, 2 studies complete: 7 changes
    wait_for(lambda: len(feed(stack, ADMIN)) == 7, 90, what="7 changes in the feed")
    everything = feed(stack, ADMIN)
    assert [e["Sequence"] for e in everything] == list(range(1, 8))  # one sequence, dense for the administrator
    assert sorted(e["Tenant"] for e in everything) == ["a"] * 4 + ["b"] * 3

    # a tenant sees its own changes only: its instances, then its study complete
    mine = feed(stack, KEY_A)
    assert sorted(kinds(mine)) == sorted([("instance-stored", s) for s in sops_a] + [("study-complete", None)])
    assert kinds(mine)[-1] == ("study-complete", None)
    assert all(e["StudyInstanceUid"] == study_a and e["State"] == "current" for e in mine)
    for e in mine[:3]:
        assert e["Action"] == "create" and e["SeriesInstanceUid"]
        assert e["Metadata"]["00080018"]["Value"] == [e["SopInstanceUid"]]  # includeMetadata defaults to true
        assert e["Metadata"]["7FE00010"]["BulkDataURI"].startswith("http://")
    assert mine[-1]["Metadata"] is None  # a study entry has no instance metadata
    theirs = feed(stack, KEY_B)
    assert len(theirs) == 3 and {e["StudyInstanceUid"] for e in theirs} == {study_b}
    assert not {e["Sequence"] for e in mine} & {e["Sequence"] for e in theirs}
    # the page says how far it looked: b may go on after 7 although its own last entry is earlier
    req = urllib.request.Request(f"http://127.0.0.1:{stack.tree['web']['port']}/dicom-web/changefeed?limit=2",
                                 headers={"X-API-Key": KEY_B})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert int(resp.headers["Changefeed-Through"]) == json.loads(resp.read())[-1]["Sequence"]
    req = urllib.request.Request(req.full_url.replace("limit=2", "limit=50"), headers={"X-API-Key": KEY_B})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["Changefeed-Through"] == "7"

    # paging with a cursor: one at a time from startSequence, and Microsoft v1's offset
    paged, cursor = [], 1
    while page := feed(stack, KEY_A, f"?startSequence={cursor}&limit=1&includeMetadata=false"):
        assert len(page) == 1 and "Metadata" not in page[0]
        paged.append(page[0]["Sequence"])
        cursor = page[0]["Sequence"] + 1
    assert paged == [e["Sequence"] for e in mine]
    assert [e["Sequence"] for e in feed(stack, KEY_A, f"?offset={mine[1]['Sequence']}")] == paged[2:]
    assert feed(stack, KEY_A, "?startSequence=1000") == []

    # bad requests say why; no credentials is 401
    for query, reason in (("?limit=51", "at most 50"), ("?limit=0", "at least 1"), ("?startSequence=x", "whole"),
                          ("?since=1", "unknown parameter")):
        status, body = get(stack, f"/changefeed{query}", KEY_A)
        assert status == 400 and reason in body, (query, status, body)
    assert get(stack, "/changefeed", None)[0] == 401

    # latest: the caller's newest entry
    status, latest_a = get(stack, "/changefeed/latest", KEY_A)
    assert status == 200 and latest_a["Sequence"] == mine[-1]["Sequence"]
    assert get(stack, "/changefeed/latest", ADMIN)[1]["Sequence"] == 7

    # a new version of one of a's instances: an update entry; the first version's entry is now replaced
    first = next(e for e in mine if e["SopInstanceUid"] == sops_a[0])
    ds = dcmread(files_a[0])
    ds.SeriesDescription = "re-sent with a correction"
    (tmp_path / "v2").mkdir()
    ds.save_as(tmp_path / "v2" / "v2.dcm")
    assert stack.storescu(tmp_path / "v2", calling_ae="CT_A").returncode == 0
    wait_for(lambda: len(feed(stack, KEY_A)) == 6, 60, what="the replacement and the study update in a's feed")
    after = feed(stack, KEY_A)
    replaced = next(e for e in after if e["Sequence"] == first["Sequence"])
    assert replaced["State"] == "replaced" and replaced["Metadata"] is None
    new = [e for e in after if e["Sequence"] > mine[-1]["Sequence"]]
    assert [(e["Kind"], e["Action"]) for e in new] == [("instance-replaced", "update"), ("study-updated", "update")]
    assert new[0]["State"] == "current" and new[0]["Metadata"]["0008103E"]["Value"] == ["re-sent with a correction"]

    # the CLI: every tenant's as an administrator, one tenant's, from a sequence or a time
    cli = [json.loads(line) for line in stack.cli("events", "--json").stdout.splitlines()]
    assert [e["Sequence"] for e in cli] == list(range(1, 10))
    assert [e["Sequence"] for e in map(json.loads, stack.cli("events", "--json", "--tenant", "a").stdout
                                       .splitlines())] == [e["Sequence"] for e in after]
    assert [json.loads(line)["Sequence"] for line in stack.cli("events", "--json", "--since", "8").stdout
            .splitlines()] == [8, 9]
    assert len(stack.cli("events", "--since", "1h", "--tenant", "b").stdout.splitlines()) == 3
    assert stack.cli("events", "--since", "2100-01-01").stdout == ""
    text = stack.cli("events", "--limit", "2").stdout.splitlines()
    assert len(text) == 2 and "instance-stored" in text[0]
    bad = stack.cli("events", "--since", "yesterday", check=False)
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr
    assert stack.cli("events", "--tenant", "nobody", check=False).returncode == 2

    # --follow: what was there, then what comes, until interrupted
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
    follower = subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(stack.config_path), "events",
                                 "--follow", "--json", "--tenant", "b", "--since", "8"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        study_c, _ = write_study(tmp_path / "c", 1)
        assert stack.storescu(tmp_path / "c", calling_ae="CT_B").returncode == 0
        line = json.loads(follower.stdout.readline())  # a's changes 8 and 9 are not b's: the first line is new
        assert (line["Kind"], line["StudyInstanceUid"], line["Tenant"]) == ("instance-stored", study_c, "b")
        line = json.loads(follower.stdout.readline())
        assert (line["Kind"], line["StudyInstanceUid"]) == ("study-complete", study_c)
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(15) == 0, follower.stderr.read()

    # a study stored over STOW-RS with b's key: its entries are b's (the tenant travels with the study to the router)
    study_d, [file_d] = write_study(tmp_path / "d", 1)
    assert _stow(file_d, f"http://127.0.0.1:{stack.tree['web']['port']}/dicom-web", KEY_B) == 200
    wait_for(lambda: [e["Kind"] for e in feed(stack, KEY_B) if e["StudyInstanceUid"] == study_d]
             == ["instance-stored", "study-complete"], 60, what="b's STOW-RS study in b's feed")
    assert not [e for e in feed(stack, KEY_A) if e["StudyInstanceUid"] == study_d]

    # a DICOMweb DELETE of that study: a delete entry; the entries before it now say deleted
    req = urllib.request.Request(f"http://127.0.0.1:{stack.tree['web']['port']}/dicom-web/studies/{study_d}",
                                 method="DELETE", headers={"X-API-Key": KEY_B})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 204
    wait_for(lambda: len([e for e in feed(stack, KEY_B) if e["StudyInstanceUid"] == study_d]) == 3, 30,
             what="the deletion in b's feed")
    d = [e for e in feed(stack, KEY_B) if e["StudyInstanceUid"] == study_d]
    assert [(e["Kind"], e["Action"], e["State"]) for e in d] == [
        ("instance-stored", "create", "deleted"), ("study-complete", "create", "deleted"),
        ("instance-deleted", "delete", "deleted")]
    assert d[2]["SopInstanceUid"] == d[0]["SopInstanceUid"] and d[0]["Metadata"] is None
    assert not [e for e in feed(stack, KEY_A) if e["Kind"] == "instance-deleted"]

    # kept as long as configured
    async def stream_config() -> dict:
        nc = await nats.connect(f"nats://127.0.0.1:{stack.tree['nats']['port']}")
        try:
            return (await api(nc, f"STREAM.INFO.{CHANGES_STREAM}"))["config"]
        finally:
            await nc.close()
    assert run_async(stream_config())["max_age"] == 400 * 86400 * 10**9


def _stow(path, base_url: str, key: str) -> int:
    """POST one Part-10 file to STOW-RS with an API key; the HTTP status."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode())
    req = urllib.request.Request(f"{base_url}/studies", data=body, method="POST", headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', "X-API-Key": key})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status


def test_nats_away_is_503_with_retry_after_and_qido_still_answers(tmp_path):
    from shared.config import load_config
    from tests.helpers import make_config
    from tests.web_harness import WebService

    tree = make_config(tmp_path, f"nats://127.0.0.1:{free_port()}")  # nothing listens there
    tree["nats"]["connect_timeout_s"] = 0.5
    with WebService(load_config(overrides=tree, environ={})) as web:
        try:
            urllib.request.urlopen(f"{web.url}/changefeed", timeout=30)
            raise AssertionError("answered without NATS")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and exc.headers["Retry-After"] == "5"
            assert "NATS cannot be reached" in exc.read().decode()
        with urllib.request.urlopen(f"{web.url}/studies", timeout=30) as resp:  # the read side does not wait
            assert resp.status == 200
