"""Store throughput on Ceph: the store service against raw librados aio writes of the same objects, same run.

For a size-1 pool and a size-2 pool (one copy per emulated datacenter), each pass writes 1000 objects of
512 KiB (random bytes, so nothing compresses or deduplicates):

- raw: librados ``aio_write_full`` with 64 writes in flight, the store's ``aio_window`` too (raw throughput is
  flat from 16 up on this machine; the store, which submits in bursts per batch, gains from 64);
- store: the real store service (``python -m dicomflow store``, a consumer-group member) consuming 1000
  InstanceReceived events from JetStream: read the claim-check from the staging backend (a directory, filled
  before the clock starts), verify blake3, write to RADOS (aio, xattrs), add the study index entry (omap),
  record the SQLite index (fsync), publish dicom.stored, ack. Timed from the first publish to the last stored
  event.

Without ``--ceph-conf`` it starts a throw-away cluster (mon + 3 memstore OSDs, tests/ceph_cluster.py) and
removes it afterwards (bluestore OSDs on sparse files by default; ``--objectstore memstore``
keeps the data in OSD RAM, where raw writes measure librados rather than storage). The last output line is one JSON object.

    .venv/bin/python bench/store.py [--objects 1000] [--size-kib 512] [--ceph-conf /etc/ceph/ceph.conf]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import nats  # noqa: E402
import yaml  # noqa: E402
from ingest import warm  # noqa: E402  (bench/ingest.py, beside this script: the same page-cache read)

from dicomflow.natsserver import NatsServer, free_port  # noqa: E402
from shared.bus.jetstream import api  # noqa: E402
from shared.config import FsBackendConfig, RadosBackendConfig, StreamConfig  # noqa: E402
from shared.contract.events import InstanceReceived, InstanceTags, utcnow  # noqa: E402
from shared.contract.subjects import instance_in  # noqa: E402
from shared.storage.fs_store import FileObjectStore  # noqa: E402
from shared.storage.objectstore import content_digest  # noqa: E402
from shared.storage.rados_layout import LAYOUT_WHOLE, xattrs_for  # noqa: E402
from shared.storage.rados_store import connect_cluster  # noqa: E402

POOLS = {"size1": ("bench-size1", "replicated_rule", 1), "size2": ("bench-size2", "everywhere", 2)}
WINDOW = 64
PARTITIONS = 16


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def raw_pass(conf: str, pool: str, objects: list[tuple[str, bytes]], xattrs: bool = False) -> float:
    """Seconds for librados aio_write_full of every object, WINDOW in flight.

    ``xattrs``: each write also sets the attributes the store sets (digest, size, layout, UIDs) in the same
    write op, as the store's placement writes do: the ceiling for what the store is asked to write.
    """
    cluster = connect_cluster(RadosBackendConfig(ceph_conf=conf, pool=pool, op_timeout_s=60))
    io = cluster.open_ioctx(pool)
    io.set_namespace("raw")
    window = threading.BoundedSemaphore(WINDOW)
    errors: list[int] = []

    def done(comp):
        if comp.get_return_value() < 0:
            errors.append(comp.get_return_value())
        window.release()

    ops = []
    t0 = time.perf_counter()
    for n, (name, data) in enumerate(objects):
        window.acquire()
        if not xattrs:
            io.aio_write_full(name, data, oncomplete=done)
            continue
        op = io.create_write_op()
        ops.append(op)
        op.write_full(data)
        study = f"1.2.826.0.1.3680043.10.1234.9.{n // 10}"
        meta = {"sop_uid": f"{study}.1.{n}", "study_uid": study, "series_uid": f"{study}.1", "size": str(len(data))}
        for k, v in xattrs_for(name, len(data), LAYOUT_WHOLE, meta).items():
            op.set_xattr(k, v)
        io.operate_aio_write_op(op, name, oncomplete=done)
    io.aio_flush()
    for _ in range(WINDOW):
        window.acquire()
    elapsed = time.perf_counter() - t0
    for op in ops:
        op.release()
    if errors:
        raise RuntimeError(f"raw writes failed: {errors[:5]}")
    for name, _ in objects:
        io.remove_object(name)
    io.close()
    cluster.shutdown()
    return elapsed


def clear_namespace(conf: str, pool: str, namespace: str) -> None:
    cluster = connect_cluster(RadosBackendConfig(ceph_conf=conf, pool=pool, op_timeout_s=60))
    io = cluster.open_ioctx(pool)
    io.set_namespace(namespace)
    for obj in list(io.list_objects()):
        io.remove_object(obj.key)
    io.close()
    cluster.shutdown()


async def _stored(nc, stream: str) -> int:
    info = await api(nc, f"STREAM.INFO.{stream}", {"subjects_filter": "dicom.stored.>"})
    return sum((info["state"].get("subjects") or {}).values())


async def _wait_streams(nc) -> None:
    deadline = time.monotonic() + 60
    while True:  # the store declares the streams when it starts
        try:
            await api(nc, f"STREAM.INFO.{StreamConfig().events_name}")
            await api(nc, f"STREAM.INFO.{StreamConfig().name}")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _publish(js, events: list[InstanceReceived]) -> None:
    for i in range(0, len(events), 64):  # bounded concurrency of in-flight PubAcks
        await asyncio.gather(*(js.publish(instance_in(e.tags.study_uid, e.tags.sop_uid), e.model_dump_json().encode(),
                                          headers={"Nats-Msg-Id": e.msg_id()}) for e in events[i:i + 64]))


async def _until_stored(nc, expect: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while await _stored(nc, StreamConfig().events_name) < expect:
        if time.monotonic() > deadline:
            raise TimeoutError("store did not finish")
        await asyncio.sleep(0.02)


async def _publish_and_wait(url: str, events: list[InstanceReceived], expect: int, timeout: float = 600,
                            paused: list[subprocess.Popen] | None = None) -> float:
    """Seconds until ``expect`` stored events exist: from the first publish, or (``paused``) from resuming the
    store processes, which were stopped (SIGSTOP) while every event was published."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await _wait_streams(nc)
        if paused:
            for proc in paused:
                proc.send_signal(signal.SIGSTOP)
            await _publish(js, events)
            t0 = time.perf_counter()
            for proc in paused:
                proc.send_signal(signal.SIGCONT)
        else:
            t0 = time.perf_counter()
            await _publish(js, events)
        await _until_stored(nc, expect, timeout)
        return time.perf_counter() - t0
    finally:
        await nc.close()


def _event(n: int, digest: str, size: int) -> InstanceReceived:
    study = f"1.2.826.0.1.3680043.10.1234.9.{n // 10}"
    tags = InstanceTags(study_uid=study, series_uid=f"{study}.1", sop_uid=f"{study}.1.{n}", modality="CT",
                        instance_number=n)
    return InstanceReceived(tags=tags, transfer_syntax_uid="1.2.840.10008.1.2.1", digest=digest, size=size,
                            backend="stage", calling_ae="BENCH", called_ae="DICOMFLOW", received_at=utcnow())


def warm_staging(stage: Path) -> float:
    """Read every staged object once; returns the share of their pages that was in the page cache before.

    A safeguard: this machine kind reclaims page cache untouched for a few minutes (DAMON ``pageout``:
    80% of a data set's pages gone three minutes after it was last read), and a store pass reading
    claim-checks from disk would be compared with raw passes that write from memory. In a running
    system the store reads what the ingest wrote moments earlier, from the cache. The share logged is
    what was still cached (99-100% in a default run, whose passes follow the staging within a minute).
    """
    files = [p for p in stage.rglob("*") if p.is_file() and "wal" not in p.relative_to(stage).parts]
    resident = None
    if shutil.which("fincore") and files:
        try:
            out = subprocess.run(["fincore", "-n", "-o", "PAGES", *map(str, files)], capture_output=True,
                                 text=True, timeout=120, check=True).stdout.split()
            page = os.sysconf("SC_PAGE_SIZE")
            pages = sum(-(-p.stat().st_size // page) for p in files)  # fincore counts whole pages
            resident = sum(map(int, out)) / pages if pages else None
        except (subprocess.SubprocessError, ValueError):
            resident = None
    warm(files)
    return resident


def store_pass(tmp: Path, conf: str, pool: str, stage: Path, objects: list[tuple[str, bytes]],
               warmup: tuple[str, bytes], members: int = 1, mode: str = "live") -> float:
    """Seconds for the store service to place every object (NATS + ``members`` store processes, fresh).

    ``live``: the events are published while the store works (the publisher shares the CPUs); ``backlog``:
    the store is paused while they are published and timed from its resumption (draining a backlog).
    """
    run = f"{pool}-{mode}"
    resident = warm_staging(stage)
    if resident is not None:
        log(f"{run}: {resident:.0%} of the staged objects were in the page cache before warming")
    nats_dir = tmp / f"nats-{run}"
    server = NatsServer(nats_dir, free_port(), 0, name="bench", log_file=tmp / f"nats-{run}.log").start()
    tree = {
        "data_dir": str(tmp / f"data-{run}"),
        "nats": {"url": server.url, "monitor_port": 0},
        "stream": {"partitions": PARTITIONS},
        "storage": {"staging": "stage",
                    "backends": {"stage": {"kind": "fs", "path": str(stage)},
                                 "ceph": {"kind": "rados", "ceph_conf": conf, "pool": pool, "namespace": "store",
                                          "aio_window": WINDOW, "op_timeout_s": 60}},
                    "policies": {"default": {"placements": ["ceph"]}}, "default_policy": "default"},
        "telemetry": {"metrics_port": 0, "log_level": "WARNING"},
    }
    cfg = tmp / f"store-{run}.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
    procs = [subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(cfg), "store"], cwd=REPO, env=env,
                              stdout=open(tmp / f"store-{run}.log", "ab"), stderr=subprocess.STDOUT)
             for _ in range(members)]
    try:
        # Warm-up: one event end to end, so the timed part excludes start-up and consumer creation.
        asyncio.run(_publish_and_wait(server.url, [_event(10**6, warmup[0], len(warmup[1]))], 1, timeout=120))
        events = [_event(n, d, len(data)) for n, (d, data) in enumerate(objects)]
        return asyncio.run(_publish_and_wait(server.url, events, len(events) + 1,
                                             paused=procs if mode == "backlog" else None))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=1000)
    ap.add_argument("--size-kib", type=int, default=512)
    ap.add_argument("--ceph-conf", help="an existing cluster (client.admin): pools are created when missing")
    ap.add_argument("--members", type=int, default=1, help="store service members (the group splits the partitions)")
    ap.add_argument("--objectstore", choices=["bluestore", "memstore"], default="bluestore",
                    help="OSD object store of the throw-away cluster: bluestore on sparse files (durable, as in "
                         "production; default) or memstore (RAM: raw writes then measure librados, not storage)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dicomflow-bench-store-"))
    cluster = None
    try:
        if args.ceph_conf:
            conf = args.ceph_conf
        else:
            from tests.ceph_cluster import CephCluster

            t0 = time.perf_counter()
            blue = {0, 1, 2} if args.objectstore == "bluestore" else set()
            cluster = CephCluster(tmp / "ceph", osds=3, bluestore=blue, osd_gb=4, op_timeout_s=60).start()
            conf = str(cluster.conf)
            log(f"throw-away cluster up in {time.perf_counter() - t0:.1f}s")
        admin = connect_cluster(RadosBackendConfig(ceph_conf=conf, pool="x", op_timeout_s=60))
        for pool, rule, size in POOLS.values():
            if not admin.pool_exists(pool):
                cmd = {"prefix": "osd pool create", "pool": pool, "pg_num": 16, "pgp_num": 16,
                       "pool_type": "replicated", "rule": rule, "size": size}
                ret, _, err = admin.mon_command(json.dumps(cmd), b"", timeout=60)
                if ret:
                    raise RuntimeError(f"pool {pool}: {err}")
                admin.mon_command(json.dumps({"prefix": "osd pool application enable", "pool": pool, "app": "dicom"}),
                                  b"", timeout=60)
        admin.shutdown()

        size = args.size_kib * 1024
        objects = [(content_digest(d), d) for d in (os.urandom(size) for _ in range(args.objects))]
        warm = os.urandom(size)
        warmup = (content_digest(warm), warm)
        stage = tmp / "stage"
        fs = FileObjectStore("stage", FsBackendConfig(path=str(stage)), tmp)
        for digest, data in [*objects, warmup]:
            fs.put(digest, data)
        mb = args.objects * size / 1e6
        rows = {}
        load_start = os.getloadavg()
        for key, (pool, _, _) in POOLS.items():
            # The first writes into a fresh memstore pool are slow (PG creation, allocation): warm the pool
            # up, then take the better of two raw passes around the store pass - the ceiling, so the ratio
            # is conservative and the machine's load shifts hit both sides.
            raw_pass(conf, pool, objects[: max(1, len(objects) // 10)])
            raw_before = raw_pass(conf, pool, objects)
            log(f"{key}: raw   {args.objects / raw_before:8.1f} objects/s  {mb / raw_before:7.1f} MB/s")
            live = store_pass(tmp, conf, pool, stage, objects, warmup, args.members, mode="live")
            log(f"{key}: store {args.objects / live:8.1f} objects/s  {mb / live:7.1f} MB/s (live: publishing meanwhile)")
            clear_namespace(conf, pool, "store")
            store = store_pass(tmp, conf, pool, stage, objects, warmup, args.members, mode="backlog")
            log(f"{key}: store {args.objects / store:8.1f} objects/s  {mb / store:7.1f} MB/s (draining a backlog)")
            clear_namespace(conf, pool, "store")  # memstore OSDs hold everything in RAM
            raw_after = raw_pass(conf, pool, objects)
            log(f"{key}: raw   {args.objects / raw_after:8.1f} objects/s  {mb / raw_after:7.1f} MB/s (again)")
            raw_x = raw_pass(conf, pool, objects, xattrs=True)
            log(f"{key}: raw+xattrs {args.objects / raw_x:8.1f} objects/s (the same writes as the store's)")
            raw = min(raw_before, raw_after)
            rows[key] = {"raw_objects_per_s": round(args.objects / raw, 1), "raw_mb_per_s": round(mb / raw, 1),
                         "store_objects_per_s": round(args.objects / store, 1), "store_mb_per_s": round(mb / store, 1),
                         "store_vs_raw_ratio": round(raw / store, 3),
                         "store_live_objects_per_s": round(args.objects / live, 1),
                         "store_live_vs_raw_ratio": round(raw / live, 3),
                         "raw_xattrs_objects_per_s": round(args.objects / raw_x, 1),
                         "store_vs_raw_xattrs_ratio": round(raw_x / store, 3)}
        print(f"\n{'pool':<6} {'raw obj/s':>10} {'raw MB/s':>9} {'store obj/s':>12} {'store MB/s':>11} {'ratio':>6}"
              f" {'live obj/s':>11} {'live ratio':>10}")
        for key, r in rows.items():
            print(f"{key:<6} {r['raw_objects_per_s']:>10.1f} {r['raw_mb_per_s']:>9.1f} {r['store_objects_per_s']:>12.1f}"
                  f" {r['store_mb_per_s']:>11.1f} {r['store_vs_raw_ratio']:>6.3f} {r['store_live_objects_per_s']:>11.1f}"
                  f" {r['store_live_vs_raw_ratio']:>10.3f}")
        out = {**rows["size1"], "size2": rows["size2"], "objects": args.objects, "object_kib": args.size_kib,
               "aio_window": WINDOW, "partitions": PARTITIONS, "store_members": args.members, "cpus": os.cpu_count(),
               "cluster": "external" if args.ceph_conf else f"throw-away: mon + 3 {args.objectstore} OSDs",
               "load_avg_start": round(load_start[0], 2), "load_avg_end": round(os.getloadavg()[0], 2)}
        print(json.dumps(out))
        return 0
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
