"""WADO-RS instance retrieve, two checkouts of dicomflow against each other: the same data, the same client, interleaved.

For judging a change to the retrieve path on a noisy machine, where two separate runs of bench/retrieve.py
differ by more than the change does. One data directory (the ct512 instances, stored as bench/retrieve.py
stores them) is served by a ``dicomflow web`` process of each checkout (``--old`` and ``--new``, each run
with its own code: cwd is the checkout), both started before the first round. Then ``--rounds`` rounds,
each a k6 run of ``--vus`` constant virtual users downloading random ct512 instances for ``--seconds``
against one and then the other (the first of a round alternates: ABBA...), with Accept
``multipart/related; type="application/dicom"; transfer-syntax=*`` as bench/retrieve.py asks.

Per round and server: requests/s, p50, p95 and p99 ms (k6's http_req_duration), and the server process's
CPU time per request (user + system, all threads: steadier than req/s where others share the CPUs). The
last line of stdout is one JSON object: ``old`` and ``new`` (the median over the rounds of each figure,
and every round's), and ``rps_ratio``, ``p95_ratio`` and ``cpu_ratio`` (new / old) of the medians.

    .venv/bin/python bench/retrieve_ab.py --old /path/to/other/checkout [--new .] [--rounds 4] [--seconds 15]
        [--vus 100] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from bench._support import log, stop_group  # noqa: E402
from bench.retrieve import ct512, run_k6, store_in_dicomflow, uids, wait_answers  # noqa: E402
from dicomflow.natsserver import free_port  # noqa: E402

K6_SCRIPT = r"""
import http from 'k6/http';
import { check } from 'k6';

const urls = JSON.parse(open(__ENV.URLS_FILE));

export const options = {
  scenarios: { download: { executor: 'constant-vus', vus: parseInt(__ENV.VUS), duration: `${__ENV.SECONDS}s` } },
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(50)', 'p(95)', 'p(99)'],
  discardResponseBodies: true,
};

const params = { headers: { Accept: __ENV.ACCEPT }, timeout: '60s' };

export default function () {
  const res = http.get(urls[Math.floor(Math.random() * urls.length)], params);
  check(res, { 'status 200': (r) => r.status === 200 });
}

export function handleSummary(data) {
  return { [__ENV.SUMMARY_FILE]: JSON.stringify(data) };
}
"""


class Server:
    """One ``dicomflow web`` process of a checkout, on a port of its own."""

    def __init__(self, checkout: Path, config: Path, logfile: Path):
        self.checkout = checkout
        self.port, metrics_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
        env["PYTHONPATH"] = str(checkout)
        self.proc = subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(config), "web",
                                      "--web-port", str(self.port), "--metrics-port", str(metrics_port)],
                                     cwd=checkout, env=env, stdout=open(logfile, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_answers(self.port, "/dicom-web/studies", 60, f"dicomflow web of {checkout} (see {logfile})")

    def cpu_s(self) -> float:
        """CPU seconds (user + system, every thread) the process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        stop_group(self.proc)


def k6_round(port: int, urls_file: Path, vus: int, seconds: int, work: Path) -> dict:
    """One constant-VU k6 run against the server on ``port``: requests/s and latency percentiles (ms)."""
    urls = [u.replace("PORT", str(port)) for u in json.loads(urls_file.read_text())]
    figures = run_k6(K6_SCRIPT, urls, work, "ab", seconds + 120, SECONDS=str(seconds), VUS=str(vus))
    return {k: figures[k] for k in ("rps", "p50_ms", "p95_ms", "p99_ms", "failed_rate")}


def summarize(rounds: list[dict]) -> dict:
    """The median of each figure over the rounds, and the rounds."""
    keys = ("rps", "p50_ms", "p95_ms", "p99_ms", "cpu_ms_per_req", "failed_rate")
    return {**{k: round(statistics.median(r[k] for r in rounds), {"failed_rate": 5, "cpu_ms_per_req": 3}.get(k, 1))
               for k in keys},
            "rounds": rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the checkout to compare against (its repository root)")
    ap.add_argument("--new", default=str(REPO), help="the checkout under test (default: this one)")
    ap.add_argument("--rounds", type=int, help="k6 runs against each (default 4; --quick: 1)")
    ap.add_argument("--seconds", type=int, help="seconds of each k6 run (default 15; --quick: 2)")
    ap.add_argument("--vus", type=int, help="constant virtual users (default 100; --quick: 10)")
    ap.add_argument("--cache", default="/tmp/dicomflow-bench-data", help="where generated data sets are kept "
                    "(shared with bench/retrieve.py and bench/ingest.py)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 30 CT instances, 1 round of 2 s at 10 VUs "
                    "unless --rounds, --seconds or --vus say otherwise")
    args = ap.parse_args()
    for name, full, quick in (("rounds", 4, 1), ("seconds", 15, 2), ("vus", 100, 10)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    warmup_s = 1 if args.quick else 3
    checkouts = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    for name, path in checkouts.items():
        if not (path / "dicomflow" / "__main__.py").exists():
            ap.error(f"--{name} {path} is not a dicomflow checkout")
    ct = ct512(Path(args.cache), quick=args.quick)
    work = Path(tempfile.mkdtemp(prefix="dicomflow-bench-retrieve-ab-"))
    cfg = work / "dicomflow.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(work / "dicomflow"),
                                   "telemetry": {"log_level": "WARNING", "metrics_port": 0}}))
    (work / "dicomflow").mkdir()
    servers: dict[str, Server] = {}
    try:
        store_in_dicomflow(cfg, ct)
        urls = [f"http://127.0.0.1:PORT/dicom-web/studies/{s}/series/{se}/instances/{i}" for s, se, i in uids(ct)]
        (work / "urls-template.json").write_text(json.dumps(urls))
        for name, path in checkouts.items():
            servers[name] = Server(path, cfg, work / f"web-{name}.log")
        log(f"old: {checkouts['old']} on {servers['old'].port}; new: {checkouts['new']} on {servers['new'].port}")
        for name in servers:  # a warm-up of each: page cache, imports, connections
            k6_round(servers[name].port, work / "urls-template.json", args.vus, warmup_s, work)
        results: dict[str, list[dict]] = {"old": [], "new": []}
        for i in range(args.rounds):
            order = ("old", "new") if i % 2 == 0 else ("new", "old")
            for name in order:
                t0, cpu0 = time.monotonic(), servers[name].cpu_s()
                r = k6_round(servers[name].port, work / "urls-template.json", args.vus, args.seconds, work)
                # the server's CPU per request: steadier than req/s where others share the machine
                r["cpu_ms_per_req"] = round(1000 * (servers[name].cpu_s() - cpu0) / max(1, r["rps"] * args.seconds), 3)
                results[name].append(r)
                log(f"round {i + 1} {name} ({time.monotonic() - t0:.0f} s): {json.dumps(r)}")
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    old, new = summarize(results["old"]), summarize(results["new"])
    print(json.dumps({"vus": args.vus, "seconds": args.seconds, "rounds": args.rounds, "cpus": os.cpu_count(),
                      "old": old, "new": new, "rps_ratio": round(new["rps"] / old["rps"], 3) if old["rps"] else None,
                      "p95_ratio": round(new["p95_ms"] / old["p95_ms"], 3) if old["p95_ms"] else None,
                      "cpu_ratio": round(new["cpu_ms_per_req"] / old["cpu_ms_per_req"], 3)
                      if old["cpu_ms_per_req"] else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
