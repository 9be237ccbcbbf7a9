"""Autoscaling under a burst: the autoscaled store group next to a fixed group at max replicas, same run.

    .venv/bin/python bench/autoscale.py [--studies 300] [--instances 4] [--max 4]

Each side gets its own nats-server and data directory, the same burst of events (published straight to
JetStream, claim-check object included, as the ingest does) and real ``dicomflow store`` workers:
- autoscaled: the autoscaler with the local actuator, min 1 / max ``--max`` workers, decisions every 0.5 s,
  target 20 events per worker, a 4 s scale-down window;
- fixed: ``--max`` workers started before the burst.
Figures: time from the burst to the first scale-up decision, time to drain (every instance stored),
replica-seconds (integral of live workers over the drain, and over the window from the burst until the
autoscaled group is back at one worker), and their ratios to the fixed group. ``lost`` is
instances never stored; ``split_studies`` studies handled by more than one worker (one after the other,
after a rebalance); ``concurrent_partitions`` times two workers handled one partition at once (must be 0).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.autoscaler_harness import (  # noqa: E402
    RunningAutoscaler,
    autoscaled_config,
    concurrent_partitions,
    consumer_count,
    fixed_workers,
    publish_studies,
    read_spans,
    split_studies,
    stored_count,
    study_uid,
)
from tests.helpers import start_nats, wait_for  # noqa: E402

PARTITIONS = 8


def _drain(config, total: int, t0: float, timeout: float = 600) -> float:
    wait_for(lambda: stored_count(config) >= total, timeout, interval=0.2, what=f"{total} stored")
    return time.monotonic() - t0


def autoscaled(tmp: Path, studies: list[tuple[str, int]], max_workers: int) -> dict:
    server = start_nats(tmp, "auto")
    try:
        path, config = autoscaled_config(tmp, server.url, PARTITIONS, max_replicas=max_workers)
        scaler = RunningAutoscaler(path, config, tmp / "workers").start()
        try:
            wait_for(lambda: scaler.running() == 1 and consumer_count(config) == PARTITIONS, 60, what="first worker")
            total = sum(n for _, n in studies)
            t0 = time.monotonic()
            publish_studies(config, studies)
            drain_s = _drain(config, total, t0)
            t_drained = t0 + drain_s
            wait_for(lambda: scaler.running() == 1, 120, what="scale-down")
            t_down = time.monotonic()
        finally:
            scaler.stop()
        ups = [d for d in scaler.decisions if d.direction == "up" and d.at >= t0]
        spans = read_spans(tmp / "workers")
        handled = {s["sop"] for s in spans}
        return {"scaled_up": bool(ups), "max_workers": scaler.max_running(t0),
                "time_to_scale_up_s": round(ups[0].at - t0, 2) if ups else None,
                "drain_s": round(drain_s, 2), "replica_seconds": round(scaler.replica_seconds(t0, t_drained), 2),
                "window_s": round(t_down - t0, 2),
                "replica_seconds_window": round(scaler.replica_seconds(t0, t_down), 2),
                "scale_down_after_drain_s": round(t_down - t_drained, 2),
                "scale_events": sum(1 for d in scaler.decisions if d.direction != "none" and d.at >= t0),
                "decisions": sum(1 for d in scaler.decisions if d.at >= t0),
                "lost": total - stored_count(config), "unhandled": total - len(handled & _sops(studies)),
                "split_studies": split_studies(spans),
                "concurrent_partitions": len(concurrent_partitions(spans, PARTITIONS))}
    finally:
        server.kill()


def fixed(tmp: Path, studies: list[tuple[str, int]], workers_n: int) -> dict:
    server = start_nats(tmp, "fixed")
    try:
        path, config = autoscaled_config(tmp, server.url, PARTITIONS)
        workers = fixed_workers(path, tmp / "workers", workers_n)
        try:
            wait_for(lambda: consumer_count(config) == PARTITIONS, 60, what="consumers")
            time.sleep(3)  # let the membership settle: every worker owns its share before the burst
            total = sum(n for _, n in studies)
            t0 = time.monotonic()
            publish_studies(config, studies)
            drain_s = _drain(config, total, t0)
        finally:
            workers.close()
        spans = read_spans(tmp / "workers")
        return {"fixed_drain_s": round(drain_s, 2), "fixed_replica_seconds": round(drain_s * workers_n, 2),
                "fixed_lost": total - stored_count(config), "fixed_split_studies": split_studies(spans),
                "fixed_concurrent_partitions": len(concurrent_partitions(spans, PARTITIONS))}
    finally:
        server.kill()


def _sops(studies: list[tuple[str, int]]) -> set[str]:
    return {f"{s}.{k + 1}" for s, n in studies for k in range(n)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=1500)
    ap.add_argument("--instances", type=int, default=4, help="instances per study")
    ap.add_argument("--max", type=int, default=4, help="max workers (and the fixed group's size)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicomflow-bench-autoscale-") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "auto").mkdir()
        (tmp / "fixed").mkdir()
        auto = autoscaled(tmp / "auto", [(study_uid(i, 1), args.instances) for i in range(args.studies)], args.max)
        print(f"autoscaled: {auto}", flush=True)
        fix = fixed(tmp / "fixed", [(study_uid(i, 2), args.instances) for i in range(args.studies)], args.max)
        print(f"fixed at {args.max}: {fix}", flush=True)
    out = {**auto, **fix, "studies": args.studies, "instances": args.studies * args.instances,
           "drain_ratio": round(auto["drain_s"] / fix["fixed_drain_s"], 3),
           "replica_seconds_ratio": round(auto["replica_seconds"] / fix["fixed_replica_seconds"], 3),
           # Over the same window (burst until the autoscaled group is back at one worker) the fixed group
           # holds max workers throughout, before and after its own drain.
           "fixed_replica_seconds_window": round(auto["window_s"] * args.max, 2)}
    out["replica_seconds_window_ratio"] = round(auto["replica_seconds_window"] / out["fixed_replica_seconds_window"], 3)
    print(f"drain time x{out['drain_ratio']} of the fixed group, replica-seconds x{out['replica_seconds_ratio']} "
          f"during the drain, x{out['replica_seconds_window_ratio']} over the {auto['window_s']} s window")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
