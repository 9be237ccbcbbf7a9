"""What the autoscaler tests and bench/autoscale.py share: a real store group driven by the real autoscaler.

Events are published straight to JetStream (as the ingest would, claim-check included: the bytes are put
in the staging store first), so a burst of hundreds of studies costs seconds, not minutes of DICOM.
Which worker handled which instance, and when, comes from the store's own traces: the workers run with
``telemetry.traces: console``, each writing its spans to its own stdout file.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import nats

from services.autoscaler.decision import Decision
from services.autoscaler.local_workers import LocalWorkers, dicomflow_command
from services.autoscaler.service import serve
from shared.bus.connection import ensure_streams
from shared.bus.jetstream import api
from shared.bus.partitioning import partition_of
from shared.config import Config, load_config
from shared.contract import subjects
from shared.contract.events import InstanceReceived, InstanceTags, utcnow
from shared.storage.objectstore import Backends, content_digest
from tests.helpers import make_config, write_config


def autoscaled_config(tmp: Path, nats_url: str, partitions: int = 8, batch: int = 8, **group) -> tuple[Path, Config]:
    """A config file for a small autoscaled store group: 8 partitions, decisions every 0.5 s, short windows."""
    policy = {"target_lag": 20, "min_replicas": 1, "max_replicas": 4, "drain_timeout_s": 60,
              "scale_up": {"stabilization_s": 0, "policies": [{"type": "pods", "value": 4, "period_s": 15}]},
              "scale_down": {"stabilization_s": 4, "policies": [{"type": "percent", "value": 100, "period_s": 15}]},
              **group}
    tree = make_config(tmp, nats_url, stream={"partitions": partitions, "duplicate_window_s": 120},
                       # The pin is kept by pulling, and a worker pulls a partition again only after handling its
                       # batch: a batch must take well under pinned_timeout_s even on a loaded 2-core machine.
                       store={"group": {"ack_wait_s": 10, "pinned_timeout_s": 4, "member_ttl_s": 2, "batch": batch}},
                       telemetry={"metrics_port": 0, "traces": "console"},
                       autoscaler={"enabled": True, "interval_s": 0.5, "groups": {"store": policy}})
    path = write_config(tmp, tree)
    return path, load_config(path, environ={})


def worker_env() -> dict[str, str]:
    """The environment of worker processes: ours without DICOMFLOW overrides (the config file says it all)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}


class RunningAutoscaler:
    """The autoscaler service with the local actuator, in a thread; records decisions and process counts."""

    def __init__(self, config_path: Path, config: Config, log_dir: Path, group: str = "store"):
        self.config = config
        self.group = group
        self.workers = LocalWorkers(dicomflow_command(str(config_path)), worker_env(), log_dir,
                                    drain_timeout_s=config.autoscaler.groups[group].drain_timeout_s)
        self.decisions: list[Decision] = []
        self.samples: list[tuple[float, int]] = []  # (monotonic time, live worker processes)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.config, self.workers, 0, self._stop, self.decisions.append)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            self._done.set()

    def _sample(self) -> None:
        while not self._done.is_set():
            self.samples.append((time.monotonic(), len(self.workers.running(self.group))))
            time.sleep(0.1)

    def start(self) -> RunningAutoscaler:
        self._thread.start()
        self._sampler.start()
        return self

    def running(self) -> int:
        return len(self.workers.running(self.group))

    def max_running(self, since: float = 0.0) -> int:
        return max((n for t, n in self.samples if t >= since), default=0)

    def replica_seconds(self, start: float, end: float) -> float:
        """Integral of live workers over [start, end], from the 0.1 s samples."""
        pts = [(t, n) for t, n in self.samples if start <= t <= end]
        return sum((t2 - t1) * n1 for (t1, n1), (t2, _) in zip(pts, pts[1:], strict=False))

    def stop(self, timeout: float = 120) -> None:
        """Stop the loop; the actuator drains every worker gracefully."""
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self.error:
            raise self.error


def fixed_workers(config_path: Path, log_dir: Path, replicas: int, group: str = "store") -> LocalWorkers:
    """A fixed-size group (no autoscaler): ``replicas`` workers started now."""
    workers = LocalWorkers(dicomflow_command(str(config_path)), worker_env(), log_dir, drain_timeout_s=60)
    workers.scale_to(group, replicas)
    return workers


def study_uid(i: int, run: int = 1) -> str:
    return f"1.2.826.0.1.3680043.10.543.{run}.{i}"


async def _publish(config: Config, studies: list[tuple[str, int]], institution: str) -> int:
    backends = Backends(config)
    data = b"autoscaler test instance"  # one small object: the store finds it placed and only indexes
    digest = content_digest(data)
    backends.get(config.storage.staging).put(digest, data)
    backends.close()
    nc = await nats.connect(config.nats_servers()[0])
    try:
        await ensure_streams(nc, config)
        js = nc.jetstream()
        n = 0
        for study, count in studies:
            futs = []
            for k in range(count):
                sop = f"{study}.{k + 1}"
                ev = InstanceReceived(tags=InstanceTags(study_uid=study, series_uid=f"{study}.1", sop_uid=sop,
                                                        institution_name=institution),
                                      transfer_syntax_uid="1.2.840.10008.1.2.1", digest=digest, size=len(data),
                                      backend=config.storage.staging, calling_ae="AUTOSCALE", called_ae="DICOMFLOW",
                                      received_at=utcnow())
                futs.append(js.publish(subjects.instance_in(study, sop), ev.model_dump_json().encode(),
                                       headers={"Nats-Msg-Id": ev.msg_id()}))
            for f in futs:
                await f
            n += count
        return n
    finally:
        await nc.close()


def publish_studies(config: Config, studies: list[tuple[str, int]], institution: str = "") -> int:
    """Publish ``count`` InstanceReceived events for each (study, count); returns how many."""
    return asyncio.run(_publish(config, studies, institution))


async def _stored(config: Config) -> int:
    nc = await nats.connect(config.nats_servers()[0])
    try:
        info = await api(nc, f"STREAM.INFO.{config.stream.events_name}", {"subjects_filter": "dicom.stored.>"})
        return sum((info["state"].get("subjects") or {}).values())
    except Exception:
        return 0
    finally:
        await nc.close()


def stored_count(config: Config) -> int:
    """Versions stored (a stored event is de-duplicated by SOP + digest + the sequence of its receipt)."""
    return asyncio.run(_stored(config))


async def _consumers(config: Config, group: str) -> int:
    nc = await nats.connect(config.nats_servers()[0])
    try:
        page = await api(nc, f"CONSUMER.NAMES.{config.stream.name}", {})
        return sum(1 for n in page.get("consumers") or [] if n.startswith(f"{group}-p"))
    except Exception:
        return 0
    finally:
        await nc.close()


def consumer_count(config: Config, group: str = "store") -> int:
    return asyncio.run(_consumers(config, group))


def _ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def read_spans(log_dir: Path, name: str = "store.instance") -> list[dict]:
    """Spans named ``name`` from every worker's stdout: study, sop, worker (host/pid), start, end."""
    out = []
    dec = json.JSONDecoder()
    for f in sorted(log_dir.glob("*.stdout")):
        text, pos = f.read_text(), 0
        while True:
            start = text.find("{", pos)
            if start < 0:
                break
            try:
                obj, pos = dec.raw_decode(text, start)
            except json.JSONDecodeError:
                pos = start + 1
                continue
            if obj.get("name") != name:
                continue
            attrs = obj.get("attributes") or {}
            out.append({"study": attrs.get("dicom.study_uid"), "sop": attrs.get("dicom.sop_uid"),
                        "worker": obj["resource"]["attributes"].get("service.instance.id"),
                        "start": _ts(obj["start_time"]), "end": _ts(obj["end_time"])})
    return out


def concurrent_partitions(spans: list[dict], partitions: int) -> list[tuple[int, str, str]]:
    """(partition, worker, other worker) for every time two workers handled one partition at once."""
    by_part: dict[int, list[dict]] = defaultdict(list)
    for s in spans:
        by_part[partition_of(s["study"], partitions)].append(s)
    clashes = []
    for p, items in by_part.items():
        items.sort(key=lambda s: s["start"])
        last_end, last_worker = float("-inf"), None
        for s in items:
            if s["start"] < last_end and s["worker"] != last_worker:
                clashes.append((p, last_worker, s["worker"]))
            if s["end"] >= last_end:
                last_end, last_worker = s["end"], s["worker"]
    return clashes


def split_studies(spans: list[dict]) -> int:
    """Studies whose instances were handled by more than one worker (one after the other, after a rebalance)."""
    workers: dict[str, set[str]] = defaultdict(set)
    for s in spans:
        workers[s["study"]].add(s["worker"])
    return sum(1 for w in workers.values() if len(w) > 1)
