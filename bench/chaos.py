"""Chaos benchmark: the long version of tests/test_chaos.py. Per mode and seed, `dicomflow run` (receivers,
store workers, a router forwarding to dcmtk's storescp, the embedded nats-server) takes a modality's instances
(several associations, each instance sent again until answered 0x0000) while a killer SIGKILLs the mode's
processes at the seed's moments. Each run is judged (tests/chaos_core.py): acknowledged instances lost, stored
or read back (`dicomflow export`) with other bytes, one SOP stored with two contents, phantoms, instances not
forwarded, studies not completed exactly once; and per kill the time until the last instance it delayed was
catalogued (recovery).

Modes, under `dicomflow run`: receiver, store, router, nats (the embedded nats-server), all (those four mixed),
catalogue (its PostgreSQL postmaster, restarted a second later as its unit or pod would be). cluster: the services
started one by one as compose runs them (each restarted when it dies) on a 3-node NATS cluster with R3 streams and
a PostgreSQL catalogue, killing receivers, store workers, the router, any NATS node, the instance stream's leader
node and the catalogue's postmaster.
Prints a table per mode, then ONE JSON line with the figures.

    .venv/bin/python bench/chaos.py [--seeds 10] [--modes receiver,store,router,nats,all,catalogue,cluster] [--instances 1000]
                                    [--studies 20] [--kills 4] [--window 40] [--ack-wait S] [--pinned-timeout S]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._support import log  # noqa: E402
from tests.chaos_core import CATALOGUE, CLUSTER_KINDS, KINDS, summarise  # noqa: E402
from tests.chaos_harness import ChaosRun  # noqa: E402

# mode -> (the kinds killed, the stack): dicomflow run (embedded nats-server; SQLite, or PostgreSQL when the
# catalogue is killed), or the services one by one on a 3-node NATS cluster with a PostgreSQL catalogue.
MODES = {**{k: ((k,), "embedded") for k in KINDS}, "all": (KINDS, "embedded"), "catalogue": ((CATALOGUE,), "embedded"),
         "cluster": (CLUSTER_KINDS, "compose")}
COLUMNS = ("mode", "runs", "kills", "acknowledged", "lost", "corrupt", "conflicting", "phantoms", "not_forwarded",
           "completion_errors", "reopened", "unrecovered_kills", "recovery_p50_s", "recovery_p95_s", "recovery_max_s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10, help="runs per mode, seeds 1..N (default 10)")
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--modes", default="receiver,store,router,nats,all,catalogue,cluster", help=f"comma-separated, of {sorted(MODES)}")
    ap.add_argument("--instances", type=int, default=1000, help="instances per run (default 1000)")
    ap.add_argument("--studies", type=int, default=20, help="studies per run (default 20)")
    ap.add_argument("--associations", type=int, default=4, help="the modality's concurrent associations")
    ap.add_argument("--kills", type=int, default=4, help="kills per run (default 4)")
    ap.add_argument("--window", type=float, default=40.0, help="seconds the sending is paced over (default 40)")
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--store-workers", type=int, default=2)
    ap.add_argument("--ack-wait", type=float, help="store/router group.ack_wait_s (default: the configuration's)")
    ap.add_argument("--pinned-timeout", type=float, help="store/router group.pinned_timeout_s (default: ditto)")
    ap.add_argument("--keep", action="store_true", help="keep each run's folder (logs, data) under the work dir")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from {sorted(MODES)}")
    group = {k: v for k, v in (("ack_wait_s", args.ack_wait), ("pinned_timeout_s", args.pinned_timeout))
             if v is not None}
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    work = Path(tempfile.mkdtemp(prefix="dicomflow-chaos-"))
    rows, runs = [], []
    t0 = time.time()
    try:
        for mode in modes:
            verdicts, recoveries = [], []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                folder = work / f"{mode}-{seed}"
                kinds, stack = MODES[mode]
                result = ChaosRun(folder, seed, kinds, studies=args.studies, instances=args.instances,
                                  associations=args.associations, window_s=args.window, kills=args.kills,
                                  receivers=args.receivers, store_workers=args.store_workers, group=group,
                                  stack=stack).execute()
                v = result.verdict
                verdicts.append(v)
                recoveries += result.recoveries
                runs.append({"mode": mode, "seed": seed, "ok": v.ok, "acknowledged": v.acknowledged,
                             "kills": [[k.kind, k.pid is not None] for k in result.kills],
                             "recoveries_s": [None if r is None else round(r, 2) for r in result.recoveries],
                             "problems": v.problems(), "sender": result.outcomes})
                log(f"{mode} seed {seed}: {'ok' if v.ok else 'FAILED'}, {v.acknowledged}/{v.sent} acknowledged, "
                    f"recoveries {[None if r is None else round(r, 1) for r in result.recoveries]}"
                    + (f"\n{v.problems()}" if not v.ok else ""))
                if not args.keep:
                    shutil.rmtree(folder, ignore_errors=True)
            rows.append(summarise(mode, verdicts, recoveries))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    total = {"acknowledged": sum(r["acknowledged"] for r in rows), "lost": sum(r["lost"] for r in rows),
             "failed_runs": sum(1 for r in runs if not r["ok"]), "runs": len(runs)}
    print(json.dumps({"bench": "chaos", "instances_per_run": args.instances, "studies_per_run": args.studies,
                      "kills_per_run": args.kills, "group": group or "configuration defaults",
                      "seconds": round(time.time() - t0, 1), "total": total, "modes": rows}))
    return 0 if total["failed_runs"] == 0 else 1


def print_table(rows: list[dict]) -> None:
    widths = [max(len(c), *(len(_cell(r[c])) for r in rows)) for c in COLUMNS]
    print("  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    for r in rows:
        print("  ".join(_cell(r[c]).rjust(w) for c, w in zip(COLUMNS, widths, strict=True)))


def _cell(v) -> str:
    return "-" if v is None else str(v)


if __name__ == "__main__":
    sys.exit(main())
