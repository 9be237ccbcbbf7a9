"""A rolling restart as `kubectl rollout restart` does it, on this machine: each real `dicomflow store` and
`dicomflow router` process is replaced one by one (start the new one, wait until it is Ready, SIGTERM the old
one) while a study streams in. Nothing may be lost, the study never split between two workers at once, and the
router announces the study complete exactly once with every instance."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest

from dicomflow.natsserver import free_port
from dicomflow.synthetic import write_study
from shared.contract import subjects
from shared.contract.uids import uid_token
from tests.helpers import REPO, make_config, scu_send, start_nats, wait_for, write_config

BATCH = 4           # instances per association
PAUSE_S = 0.3       # between associations: the study streams in for as long as the replacements take
MAX_BATCHES = 150   # the stream's upper bound (600 instances, 45 s or more), far beyond 4 replacements
AFTER_LAST = 4      # batches still sent after the last replacement, so a replacement's new owner handles some


@dataclass
class Proc:
    """One dicomflow service process with its metrics/health port; its spans go to <name>.spans."""

    name: str
    kind: str
    port: int
    popen: subprocess.Popen

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=3) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False


class Deployment:
    """The processes of one test, started and stopped like pods."""

    def __init__(self, tmp: Path, config: Path):
        self.tmp, self.config, self.procs, self.all = tmp, config, {}, []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}

    def start(self, name: str, kind: str) -> Proc:
        port = free_port()
        popen = subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(self.config), kind,
                                  "--metrics-port", str(port)], cwd=REPO, env=self.env,
                                 stdout=open(self.tmp / f"{name}.spans", "wb"),
                                 stderr=open(self.tmp / f"{name}.log", "wb"))
        proc = Proc(name, kind, port, popen)
        self.procs[name] = proc
        self.all.append(proc)
        return proc

    def wait_ready(self, proc: Proc) -> None:
        wait_for(lambda: proc.ready() or proc.popen.poll() is not None, 90, what=f"{proc.name} ready")
        assert proc.popen.poll() is None, (self.tmp / f"{proc.name}.log").read_text()[-3000:]

    def terminate(self, proc: Proc) -> int:
        """SIGTERM and wait: the graceful leave must finish well within a pod's grace period."""
        proc.popen.send_signal(signal.SIGTERM)
        return proc.popen.wait(120)

    def cleanup(self) -> None:
        for p in self.all:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in self.all:
            try:
                p.popen.wait(60)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()


def spans_of(path: Path, name: str) -> list[dict]:
    """The spans the console exporter wrote (concatenated JSON objects)."""
    text, dec, out, i = path.read_text(), json.JSONDecoder(), [], 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return out
        obj, i = dec.raw_decode(text, i)
        if obj.get("name") == name:
            out.append(obj)


def ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


async def study_events(url: str, study: str) -> list[tuple[str, dict]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(f"dicom.study.*.{uid_token(study)}", ordered_consumer=True)
        out = []
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                return out
            out.append((msg.subject, json.loads(msg.data)))
    finally:
        await nc.close()


@pytest.mark.timeout(420)
def test_rolling_restart_of_store_and_router_loses_and_splits_nothing(tmp_path):
    server = start_nats(tmp_path)
    tree = make_config(tmp_path, server.url,
                       router={"completion": {"quiet_s": 3}, "group": {"ack_wait_s": 10, "pinned_timeout_s": 4,
                                                                       "member_ttl_s": 2}},
                       telemetry={"metrics_port": 0, "traces": "console"})
    tree["ingest"]["host"] = "127.0.0.1"
    dep = Deployment(tmp_path, write_config(tmp_path, tree))
    study, files = write_study(tmp_path / "study", BATCH * MAX_BATCHES)
    statuses: list[int] = []
    sent: list[Path] = []
    replaced = threading.Event()
    failure: list[BaseException] = []

    def stream() -> None:
        try:
            after = 0
            for i in range(MAX_BATCHES):
                batch = files[i * BATCH:(i + 1) * BATCH]
                statuses.extend(scu_send(tree["ingest"]["port"], batch))
                sent.extend(batch)
                if replaced.is_set():
                    after += 1
                    if after >= AFTER_LAST:
                        return
                time.sleep(PAUSE_S)
        except BaseException as exc:  # surfaced by the main thread
            failure.append(exc)

    try:
        ingest = dep.start("ingest", "ingest")
        old = [dep.start(n, k) for n, k in (("store-a", "store"), ("store-b", "store"),
                                            ("router-a", "router"), ("router-b", "router"))]
        for p in (ingest, *old):
            dep.wait_ready(p)
        sender = threading.Thread(target=stream, name="study-stream")
        sender.start()
        wait_for(lambda: len(sent) >= 2 * BATCH or failure, 60, what="the study to start streaming")
        # One by one, as a Deployment with maxSurge 1 / maxUnavailable 0 does it.
        for i, p in enumerate(old):
            new = dep.start(f"{p.kind}-{'cdef'[i % 2 if p.kind == 'router' else i]}", p.kind)
            dep.wait_ready(new)
            assert dep.terminate(p) == 0, f"{p.name} did not leave cleanly"
            assert sender.is_alive(), "the study finished streaming before every worker was replaced"
        replaced.set()
        sender.join(180)
        assert not failure, failure
        assert statuses and all(s == 0 for s in statuses), f"statuses other than success: {set(statuses)}"
        n = len(sent)

        # Nothing lost: every sent instance is in the index, once.
        def stored() -> int:
            res = subprocess.run([sys.executable, "-m", "dicomflow", "--config", str(dep.config), "studies", "--json"],
                                 cwd=REPO, env=dep.env, capture_output=True, text=True, timeout=60)
            return next((s["instances"] for s in json.loads(res.stdout or "[]") if s["study_uid"] == study), 0)

        wait_for(lambda: stored() == n, 120, interval=1, what=f"{n} instances in the index")
        # The router announces the study complete once, with every instance (no re-open = no split state).
        events = wait_for(lambda: [e for e in asyncio.run(study_events(server.url, study))
                                   if e[0] == subjects.study_complete(study)], 90, interval=1,
                          what="the study-complete event")
        all_events = asyncio.run(study_events(server.url, study))
        assert [s for s, _ in all_events if s == subjects.study_updated(study)] == [], "the study was re-opened"
        assert len(events) == 1 and events[0][1]["instances"] == n, events
    finally:
        dep.cleanup()
        server.kill()

    # No instance handled by two store workers at once, and the study never by two workers at once: the
    # handling spans (start..end, per process) of different workers do not overlap.
    spans = []
    for p in dep.all:
        if p.kind == "store":
            spans += [(p.name, ts(s["start_time"]), ts(s["end_time"]), s["attributes"]["dicom.sop_uid"])
                      for s in spans_of(tmp_path / f"{p.name}.spans", "store.instance")
                      if s["attributes"].get("dicom.study_uid") == study]
    sops = {s[3] for s in spans}
    assert len(sops) == n, f"{n} sent, {len(sops)} handled by the store"
    workers = {s[0] for s in spans}
    assert len(workers) >= 2, "the study never moved between workers: the replacement did not exercise a handover"
    spans.sort(key=lambda s: s[1])
    for a, b in zip(spans, spans[1:], strict=False):
        if a[0] != b[0]:
            assert b[1] >= a[2], f"{a[0]} and {b[0]} handled the study at the same time: {a} / {b}"
