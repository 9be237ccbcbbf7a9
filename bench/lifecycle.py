"""Data lifecycle: staging bytes over time while the staging releaser works, and ingest throughput with it.

``staging``: ``dicomflow run`` with a staging backend apart from the placement (``archive``), the
releaser on, and a router forwarding every instance to two dcmtk ``storescp`` targets. One of them is
down for the first half of an ``--instances`` ingest (64x64 CT, ``--studies`` studies) and started
before the second half. The staging backend's objects and bytes are sampled every
``--sample-s`` seconds from the start of the ingest until staging is back to zero (it must be: the
last line says ``staging_returned_to_zero``). While the target is down its forward jobs hold the
staged bytes; once it is back they are delivered and released.

``throughput``: ingest throughput (storescu, ``--assocs`` associations) of ``dicomflow run`` with
release on (staging apart, the releaser sweeping) against bench/ingest.py's baseline approach (its
default configuration: the staging backend is the placement, nothing to release) and Orthanc, in the
same run with bench/ingest.py's receivers and helpers, passes interleaved and rotated like it; each
row is the median of ``--passes``.

Each measure is one function (``MEASURES``: name -> function(args, scratch) -> dict) whose result is
one key of the last line, a JSON object; ``--measures`` picks them.

    .venv/bin/python bench/lifecycle.py [--instances 10000] [--measures staging,throughput] [--passes 3]
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
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._support import ensure_netns, log, stop_group  # noqa: E402
from bench.ingest import SEND_ENV, Dicomflow, Orthanc, Storescp, count_files, dataset, send, timed_pass, warm  # noqa: E402
from dicomflow.natsserver import free_port, wait_port  # noqa: E402

RULES = """
rules:
  - name: everything
    match: {}
    action: forward
    to: [UP, DOWN]
"""


def release_settings(rules: Path | None = None, targets: dict | None = None, min_age_s: float = 10) -> dict:
    """The dotted settings of a run with staging apart from the placement and the releaser on (and routing)."""
    out = {"storage": {"staging": "staging", "default_policy": "default",
                       "backends": {"staging": {"kind": "fs", "path": "staging"},
                                    "archive": {"kind": "fs", "path": "objects"}},  # where Dicomflow.count looks
                       "policies": {"default": {"placements": ["archive"]}}},
           "release": {"enabled": True, "interval_s": 1, "min_age_s": min_age_s}}
    if rules:
        out["router"] = {"rules_file": str(rules), "targets": targets or {},
                         "forward": {"batch": 64, "backoff_initial_s": 0.5, "backoff_max_s": 2, "max_attempts": 100000,
                                     "probe_interval_s": 1}}
    return out


def staged(root: Path) -> tuple[int, int]:
    """(objects, bytes) of an fs staging backend."""
    n = size = 0
    for i in range(256):
        try:
            with os.scandir(root / f"{i:02x}") as it:
                for e in it:
                    if len(e.name) == 64:
                        try:
                            size += e.stat().st_size
                            n += 1
                        except FileNotFoundError:
                            pass
        except FileNotFoundError:
            continue
    return n, size


class Gateway:
    """A dcmtk storescp forward target that can be started late."""

    def __init__(self, work: Path, name: str):
        self.name, self.port, self.dir = name, free_port(), work / f"gw-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["storescp", "--fork", "-aet", self.name, "-od", str(self.dir), str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=SEND_ENV)
        wait_port("127.0.0.1", self.port, 30)

    def received(self) -> int:
        return count_files(self.dir)

    def target(self) -> dict:
        return {"kind": "dicom", "host": "127.0.0.1", "port": self.port, "ae_title": self.name, "timeout_s": 30}


def _files(cache: Path, instances: int, studies: int) -> list[Path]:
    from dicomflow.synthetic import write_study

    folder = cache / f"lifecycle-{instances}-{studies}"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        log(f"generating {instances} instances of 64x64 in {studies} studies into {folder}")
        per = [instances // studies + (1 if s < instances % studies else 0) for s in range(studies)]
        for s, n in enumerate(per):
            write_study(folder / f"study{s:03d}", n, rows=64, cols=64)
        (folder / ".complete").write_text("ok")
    return sorted(folder.glob("study*/*.dcm"))


def staging_over_time(args: argparse.Namespace, scratch: Path) -> dict:
    """Staging objects/bytes sampled during an ingest with one forward target down, then back."""
    files = _files(Path(args.cache), args.instances, args.studies)
    work = Path(tempfile.mkdtemp(prefix="lifecycle-staging-", dir=scratch))
    up, down = Gateway(work, "UP"), Gateway(work, "DOWN")
    (work / "rules.yaml").write_text(RULES)
    rcv = Dicomflow(work, args.workers, overrides=release_settings(
        work / "rules.yaml", {"UP": up.target(), "DOWN": down.target()}, args.min_age_s))
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            n, b = staged(rcv.data / "staging")
            samples.append((round(time.monotonic() - t0, 1), n, b))
            stop.wait(args.sample_s)

    half = len(files) // 2
    sampler = threading.Thread(target=sample, daemon=True)
    try:
        up.start()
        warm(files)
        rcv.start()
        rcv.settle()
        t0 = time.monotonic()
        sampler.start()
        log(f"staging: sending {half} instances with target DOWN down")
        first = send(files[:half], rcv.port, rcv.aec, args.assocs)
        down_up_at = time.monotonic() - t0
        down.start()
        log(f"staging: target DOWN back at {down_up_at:.1f} s; sending {len(files) - half} more")
        second = send(files[half:], rcv.port, rcv.aec, args.assocs)
        sent_at = time.monotonic() - t0
        deadline = time.monotonic() + args.drain_timeout_s
        while time.monotonic() < deadline:
            if samples and samples[-1][1] == 0 and up.received() >= len(files) and down.received() >= len(files):
                break
            time.sleep(1)
        zero_at = time.monotonic() - t0
        stop.set()
        sampler.join()
        final = staged(rcv.data / "staging")
        stored = staged(rcv.data / "objects")[0]
    finally:
        stop.set()
        rcv.stop()
        stop_group(up.proc)
        stop_group(down.proc)
    peak = max(samples, key=lambda s: s[2]) if samples else (0, 0, 0)
    at_back = [s for s in samples if s[0] <= down_up_at]
    step = max(1, len(samples) // 60)
    return {"instances": len(files), "studies": args.studies, "assocs": args.assocs,
            "ingest_instances_per_s": round(len(files) / (first + second), 1),
            "target_down_until_s": round(down_up_at, 1), "sent_at_s": round(sent_at, 1),
            "staging_zero_at_s": round(zero_at, 1) if final[0] == 0 else None,
            "staging_returned_to_zero": final == (0, 0), "final_staged_objects": final[0],
            "final_staged_bytes": final[1], "stored": stored, "received_up": up.received(),
            "received_down": down.received(),
            "peak_staged_objects": peak[1], "peak_staged_bytes": peak[2], "peak_at_s": peak[0],
            "staged_bytes_when_target_back": at_back[-1][2] if at_back else 0,
            "samples_t_objects_bytes": samples[::step] + ([samples[-1]] if samples and len(samples) % step else [])}


class _Stored(Dicomflow):
    """dicomflow counted by its placement's objects (not its study index files), waiting for the store: with
    release on the placement is filled by the store after the answers."""

    expected = 0

    def count(self) -> int:
        deadline, got = time.monotonic() + 300, 0
        while time.monotonic() < deadline:
            got = staged(self.data / "objects")[0]
            if got >= self.expected:
                break
            time.sleep(0.5)
        return got


def _throughput_pass(kind: str, files: list[Path], args: argparse.Namespace, scratch: Path) -> float:
    """bench/ingest.py's one_pass for the receivers of this benchmark: fresh receiver, warm, sync, settle, send."""
    work = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=scratch))
    if kind.startswith("dicomflow"):
        rcv = _Stored(work, args.workers, overrides=release_settings(min_age_s=args.min_age_s)
                      if kind == "dicomflow-release" else None)
        rcv.expected = len(files)
    else:
        rcv = {"orthanc": lambda: Orthanc(work), "storescp": lambda: Storescp(work)}[kind]()
    return timed_pass(kind, rcv, files, args.assocs)


def ingest_throughput(args: argparse.Namespace, scratch: Path) -> dict:
    """Ingest instances/s with release on vs the baseline approach and a peer, medians of interleaved passes."""
    files = dataset(Path(args.cache), args.dataset)
    receivers = ["dicomflow-release", "dicomflow", *[p for p in args.peers.split(",") if p]]
    rates: dict[str, list[float]] = {r: [] for r in receivers}
    for p in range(args.passes):
        for r in receivers[p % len(receivers):] + receivers[:p % len(receivers)]:
            rate = _throughput_pass(r, files, args, scratch)
            rates[r].append(rate)
            log(f"throughput {args.dataset}/{args.assocs} pass {p + 1} {r:<18} {rate:8.1f} inst/s "
                f"(load {os.getloadavg()[0]:.2f})")
    med = {r: round(statistics.median(v), 1) for r, v in rates.items()}
    out: dict = {"dataset": args.dataset, "instances": len(files), "assocs": args.assocs, "passes": args.passes,
                 "instances_per_s": med}
    for peer in receivers[2:]:
        if med[peer]:
            out[f"release_vs_{peer}"] = round(med["dicomflow-release"] / med[peer], 2)
            out[f"baseline_vs_{peer}"] = round(med["dicomflow"] / med[peer], 2)
    out["release_vs_baseline"] = round(med["dicomflow-release"] / med["dicomflow"], 2) if med["dicomflow"] else None
    return out


# name -> measure; each returns the dict reported under its name (a delete benchmark adds itself here).
MEASURES: dict[str, Callable[[argparse.Namespace, Path], dict]] = {
    "staging": staging_over_time,
    "throughput": ingest_throughput,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measures", default=",".join(MEASURES), help="which measures, comma-separated")
    ap.add_argument("--instances", type=int, default=10_000, help="staging: instances ingested")
    ap.add_argument("--studies", type=int, default=20, help="staging: studies they are spread over")
    ap.add_argument("--assocs", type=int, default=4, help="storescu associations in parallel")
    ap.add_argument("--workers", type=int, default=None, help="ingest.workers (default: the configuration's)")
    ap.add_argument("--min-age-s", type=float, default=10, help="release.min_age_s (the grace)")
    ap.add_argument("--sample-s", type=float, default=1.0, help="staging: seconds between samples")
    ap.add_argument("--drain-timeout-s", type=float, default=600, help="staging: longest wait for staging to empty")
    ap.add_argument("--dataset", default="small64", help="throughput: a bench/ingest.py data set (small64, ct512)")
    ap.add_argument("--passes", type=int, default=3, help="throughput: passes per receiver; the median is reported")
    ap.add_argument("--peers", default="orthanc", help="throughput: peers in the same run (orthanc, storescp)")
    ap.add_argument("--cache", default="/tmp/dicomflow-bench-data", help="where generated data sets are kept")
    args = ap.parse_args()
    chosen = [m for m in args.measures.split(",") if m]
    unknown = set(chosen) - set(MEASURES)
    if unknown:
        ap.error(f"--measures: unknown {sorted(unknown)}; known: {', '.join(MEASURES)}")
    ensure_netns("storescp/Orthanc bind every interface")
    load_start = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="dicomflow-lifecycle-"))
    out: dict = {"cpus": os.cpu_count(), "load_avg_start": [round(x, 2) for x in load_start]}
    try:
        for name in chosen:
            out[name] = MEASURES[name](args, scratch)
            log(f"{name}: {json.dumps({k: v for k, v in out[name].items() if k != 'samples_t_objects_bytes'})}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
