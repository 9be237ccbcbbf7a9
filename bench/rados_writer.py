"""RADOS writes of one process, interleaved in the same run: ``put``, the buffered writer (what an ingest writes
to a rados staging backend through) and the streaming writer a store copy uses (``writer(limit, digest)``).

Small objects (``--size-kib``, 500 by default) must cost the streaming writer no more than put: below
``chunk_bytes`` it holds the bytes and writes them with put's one write. A large object (``--large-mib``,
0: skipped) is written by put and by the streaming writer in turn, timed, with the peak RSS each adds measured
in a child process of its own (put's includes building the object in memory, as a caller of put has it; the
streaming writer's time includes hashing its bytes, as a copy's does, and making them). Rounds alternate the methods so load on a shared machine hits each alike.

Without ``--ceph-conf`` it starts a throw-away cluster (mon + 1 memstore OSD, tests/ceph_cluster.py) and
removes it afterwards. The last output line is one JSON object.

    .venv/bin/python bench/rados_writer.py [--objects 200] [--size-kib 500] [--rounds 5] [--large-mib 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._support import log  # noqa: E402
from shared.config import RadosBackendConfig  # noqa: E402
from shared.storage.objectstore import BufferedWriter, content_digest  # noqa: E402
from shared.storage.rados_store import RadosObjectStore  # noqa: E402

PIECE = 64 * 1024  # what a receiver or a copy hands a writer at a time

_LARGE_CHILD = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
from shared.config import RadosBackendConfig
from shared.storage.objectstore import content_digest
from shared.storage.rados_store import RadosObjectStore

def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))

store = RadosObjectStore("bench", RadosBackendConfig(**json.loads(sys.argv[1])))
import blake3
method, mib = sys.argv[2], int(sys.argv[3])
seed = os.urandom(16)

def block(i):  # fresh bytes each MiB, as a copy reads them (one block repeated would be one object in memory)
    return blake3.blake3(seed + b"%d" % i).digest(length=2**20)

before = peak()
if method == "put":
    data = b"".join(block(i) for i in range(mib))
    digest = content_digest(data)
    t0 = time.perf_counter()  # the write alone: its bytes were in memory already
    store.put(digest, data)
else:
    hasher = blake3.blake3()
    for i in range(mib):
        hasher.update(block(i))
    digest = hasher.hexdigest()
    t0 = time.perf_counter()
    w = store.writer(10**12, digest)
    for i in range(mib):
        w.write(block(i))
    w.commit()
print(json.dumps({{"seconds": time.perf_counter() - t0, "rss_mib": (peak() - before) / 1024}}))
store.remove(digest)
"""


def small_round(store: RadosObjectStore, method: str, objects: list[bytes]) -> float:
    """Objects per second written by ``method``, one object after the other (as one receiver writes)."""
    t0 = time.perf_counter()
    for data in objects:
        digest = content_digest(data)
        if method == "put":
            store.put(digest, data)
            continue
        w = BufferedWriter(store, 10**9) if method == "buffered writer" else store.writer(10**9, digest)
        for i in range(0, len(data), PIECE):
            w.write(data[i:i + PIECE])
        w.commit()
    rate = len(objects) / (time.perf_counter() - t0)
    for data in objects:
        store.remove(content_digest(data))
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=200, help="small objects per round and method")
    ap.add_argument("--size-kib", type=int, default=500, help="size of a small object")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (each runs every method once, in turn)")
    ap.add_argument("--large-mib", type=int, default=0, help="also write one object of this size (MiB) both ways")
    ap.add_argument("--ceph-conf", default="", help="an existing cluster (pool 'bench' must exist)")
    args = ap.parse_args()

    cluster = None
    conf = args.ceph_conf
    if not conf:
        from tests.ceph_cluster import CephCluster
        cluster = CephCluster(Path(tempfile.mkdtemp(prefix="rados-writer-")) / "c", osds=1, osd_gb=4).start()
        cluster.create_pool("bench")
        conf = str(cluster.conf)
    cfg = RadosBackendConfig(ceph_conf=conf, pool="bench", op_timeout_s=30)
    store = RadosObjectStore("bench", cfg)
    methods = ["put", "buffered writer", "streaming writer"]
    rates: dict[str, list[float]] = {m: [] for m in methods}
    large: dict[str, list[dict]] = {"put": [], "streaming writer": []}
    try:
        objects = [os.urandom(args.size_kib * 1024) for _ in range(args.objects)]
        small_round(store, "put", objects[:20])  # warm-up: connections, PGs
        for r in range(args.rounds):
            order = methods[r % 3:] + methods[:r % 3]
            for method in order:
                rates[method].append(small_round(store, method, objects))
            log(f"round {r + 1}: " + ", ".join(f"{m} {rates[m][-1]:.0f}/s" for m in methods))
            if args.large_mib:
                for method in (["put", "streaming"] if r % 2 == 0 else ["streaming", "put"]):
                    res = subprocess.run([sys.executable, "-c", _LARGE_CHILD.format(repo=str(REPO)),
                                          cfg.model_dump_json(), method, str(args.large_mib)],
                                         capture_output=True, text=True, timeout=600, check=True)
                    large["put" if method == "put" else "streaming writer"].append(json.loads(res.stdout))
                log(f"round {r + 1} large: " + ", ".join(
                    f"{m} {v[-1]['seconds']:.2f} s +{v[-1]['rss_mib']:.0f} MiB" for m, v in large.items()))
    finally:
        store.close()
        if cluster is not None:
            cluster.stop()
    out = {"size_kib": args.size_kib, "objects": args.objects, "rounds": args.rounds,
           "objects_per_s_median": {m: round(statistics.median(v), 1) for m, v in rates.items()}}
    if args.large_mib:
        out["large_mib"] = args.large_mib
        out["large"] = {m: {"seconds_median": round(statistics.median(x["seconds"] for x in v), 2),
                            "peak_rss_mib_median": round(statistics.median(x["rss_mib"] for x in v), 1)}
                        for m, v in large.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
