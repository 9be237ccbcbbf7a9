"""Ingest throughput: dicomflow against dcmtk storescp and Orthanc, in one run, on the same data.

Sender: dcmtk ``storescu`` (TCP_NODELAY=1), one association or four in parallel (a quarter of the
files each). Receivers, each started fresh for every pass so nothing is a duplicate:

- dicomflow: ``python -m dicomflow --config <tmp> run`` (NATS + ingest + store): success only after
  the bytes are fsynced and JetStream acknowledged the event;
- storescp: dcmtk ``storescp --fork -od DIR`` (writes files, no fsync: the practical ceiling);
- orthanc: Orthanc from Debian with its default configuration (fsyncs every file, SQLite index),
  only ports and directories set.

Before each pass every file of the data set is read once, outside the timing: this machine kind
reclaims page cache that has not been touched for a while (DAMON ``pageout``), so otherwise storescu
would send part of the data set from disk, competing with the receiver's own writes, in whichever
pass follows a pause (measured: 80% of the CT files' pages gone three minutes after they were last
read; over four runs, dicomflow's first pass of a data set, which always came first, was its slowest
of three in 7 of the 8 first rows). The receivers take turns going first, one more step on per pass,
so whatever the first pass of a row still pays is shared. Before each pass, ``sync`` flushes what
the previous receiver left unwritten (storescp does not fsync), so its writeback does not land in
the next receiver's pass. Every pass's folder is removed only when the run ends: deleting many files
slows file creation on this machine's filesystem for the next half minute, which would tax the
receiver that runs next.

Data sets: ``ct512`` (300 CT instances, 512x512 16-bit, ~0.5 MiB each) and ``small64`` (2,000
instances of 64x64: per-instance overhead). Each row is the median of ``--passes`` passes (5: on
this machine kind the medians of 3 moved by up to 30% between runs of the same code, a receiver's
passes within one row by up to 2.4x). Timing starts once the receiver's processes are idle (start-up
work such as JetStream consumers is done).

storescp and Orthanc cannot bind to loopback only, so as root the whole benchmark re-runs itself
in a private network namespace (``unshare -n``, only ``lo`` up). The machine may be shared: the
load average is printed at start and end. The last line is one JSON object.

    .venv/bin/python bench/ingest.py [--passes 5] [--workers N] [--only dicomflow,orthanc]
                                     [--set storage.backends.local.wal_max_object_bytes=1048576]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from bench._support import ensure_netns, log, stop_group  # noqa: E402
from dicomflow.natsserver import free_port, wait_port  # noqa: E402
from shared.config import set_path  # noqa: E402

DATASETS = {"ct512": (300, 512, 1), "small64": (2000, 64, 10)}  # instances, rows=cols, studies
ASSOCS = (1, 4)
RECEIVERS = ("dicomflow", "dicomflow-pynetdicom", "storescp", "orthanc")
SEND_ENV = {**os.environ, "TCP_NODELAY": "1"}




def dataset(cache: Path, name: str) -> list[Path]:
    """The files of a data set, generated once into ``cache``."""
    from dicomflow.synthetic import write_study

    count, size, studies = DATASETS[name]
    folder = cache / f"{name}-{count}"
    marker = folder / ".complete"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        log(f"generating {name}: {count} instances of {size}x{size} in {folder}")
        for s in range(studies):
            write_study(folder / f"study{s}", count // studies, rows=size, cols=size)
        marker.write_text("ok")
    return sorted(folder.glob("study*/*.dcm"))


def warm(files: list[Path]) -> None:
    """Read every file once, so that storescu sends from the page cache in whichever pass comes first."""
    buf = bytearray(1024 * 1024)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def count_files(root: Path, skip: tuple[str, ...] = ()) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file() and not set(skip) & set(p.relative_to(root).parts))


def send(files: list[Path], port: int, aec: str, assocs: int) -> float:
    """Send ``files`` with ``assocs`` parallel storescu processes; returns the seconds until all finished."""
    chunks = [files[i::assocs] for i in range(assocs)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "BENCHSCU", "-aec", aec, "127.0.0.1", str(port), *map(str, c)],
                              env=SEND_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in chunks]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    elapsed = time.perf_counter() - t0
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu exited {p.returncode}: {err.decode(errors='replace')[-2000:]}")
    return elapsed


def _session_cpu(sid: int) -> float:
    """CPU seconds used so far by every process of session ``sid``."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the command: state, ppid, pgrp, session, ...
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Receiver:
    """A receiver started fresh in its own directory; ``count()`` says how many instances it holds."""

    aec = "ANY"

    def __init__(self, work: Path):
        self.work = work
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def stop(self) -> None:
        stop_group(self.proc)

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until the receiver's processes are idle (start-up work done: streams, consumers, indexes)."""
        deadline = time.monotonic() + timeout
        last = _session_cpu(self.proc.pid)
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = _session_cpu(self.proc.pid)
            if now - last < 0.05:  # under 10% of one core
                return
            last = now

    def _popen(self, argv: list[str], **kw) -> None:
        self.proc = subprocess.Popen(argv, stdout=open(self.work / "log", "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True, **kw)


class Dicomflow(Receiver):
    aec = "DICOMFLOW"

    def __init__(self, work: Path, workers: int | None, engine: str = "lean", overrides: dict | None = None):
        super().__init__(work)
        self.data = work / "data"
        ingest = {"port": self.port, "host": "127.0.0.1", "engine": engine}
        if workers:
            ingest["workers"] = workers
        self.tree = {"data_dir": str(self.data), "nats": {"port": free_port(), "monitor_port": 0},
                     "ingest": ingest, "telemetry": {"metrics_port": 0, "log_level": "WARNING"}}
        for dotted, value in (overrides or {}).items():
            set_path(self.tree, dotted.split("."), value)

    def start(self) -> None:
        from shared.config import load_config

        cfg = self.work / "dicomflow.yaml"
        cfg.write_text(yaml.safe_dump(self.tree))
        workers = load_config(cfg, environ={}).ingest.workers
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
        self._popen([sys.executable, "-m", "dicomflow", "--config", str(cfg), "run"], cwd=REPO, env=env)
        deadline = time.monotonic() + 90
        # Every receiver must be listening before the clock starts (the shared socket of the lean
        # engine, or one SO_REUSEPORT socket per receiver of the pynetdicom engine).
        while self._listeners() < workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dicomflow did not start: " + (self.work / "log").read_text()[-3000:])
            time.sleep(0.1)
        wait_port("127.0.0.1", self.port, 10)

    def _listeners(self) -> int:
        """Processes holding a listening socket on the DICOM port (a supervisor counts too)."""
        res = subprocess.run(["ss", "-Hltnp", f"sport = :{self.port}"], capture_output=True, text=True)
        return len(set(re.findall(r"pid=(\d+)", res.stdout)))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # nats-server runs in a session of its own: after a forced stop, end what still names our directory.
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(self.work).encode() in cmdline.read_bytes():
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue

    def count(self) -> int:
        return count_files(self.data / "objects", skip=("tmp", "wal"))


class Storescp(Receiver):
    def start(self) -> None:
        (self.work / "out").mkdir()
        self._popen(["storescp", "--fork", "-od", str(self.work / "out"), str(self.port)], env=SEND_ENV)
        wait_port("127.0.0.1", self.port, 30)

    def count(self) -> int:
        return count_files(self.work / "out")


class Orthanc(Receiver):
    aec = "ORTHANC"

    def start(self) -> None:
        self.http = free_port()
        # Orthanc's defaults (SyncStorageArea: fsync every file, SQLite index); only where and which ports.
        conf = {"Name": "bench", "StorageDirectory": str(self.work / "storage"), "IndexDirectory": str(self.work / "index"),
                "HttpPort": self.http, "DicomPort": self.port, "DicomAet": "ORTHANC", "Plugins": [],
                "RemoteAccessAllowed": False}
        path = self.work / "orthanc.json"
        path.write_text(json.dumps(conf))
        self._popen(["Orthanc", str(path)], env=SEND_ENV)
        wait_port("127.0.0.1", self.port, 60)
        wait_port("127.0.0.1", self.http, 60)

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/statistics", timeout=30) as resp:
            return int(json.load(resp)["CountInstances"])


def one_pass(kind: str, files: list[Path], assocs: int, scratch: Path, workers: int | None,
             overrides: dict | None = None) -> float:
    """Start a fresh receiver, send, check every instance arrived, stop; returns instances/s."""
    work = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=scratch))
    rcv = {"dicomflow": lambda: Dicomflow(work, workers, overrides=overrides),
           "dicomflow-pynetdicom": lambda: Dicomflow(work, workers, engine="pynetdicom", overrides=overrides),
           "storescp": lambda: Storescp(work),
           "orthanc": lambda: Orthanc(work)}[kind]()
    return timed_pass(kind, rcv, files, assocs)


def timed_pass(kind: str, rcv, files: list[Path], assocs: int) -> float:
    """Start ``rcv`` (a receiver not yet started), send ``files``, check every instance arrived, stop; returns
    instances/s."""
    try:
        warm(files)
        rcv.start()
        # The previous receiver's unsynced files (storescp never fsyncs) would otherwise be written
        # back by the kernel during this pass and slow its fsyncs: flush them before the clock starts.
        os.sync()
        rcv.settle()
        elapsed = send(files, rcv.port, rcv.aec, assocs)
        got = rcv.count()
        if got != len(files):
            raise RuntimeError(f"{kind}: {got} of {len(files)} instances arrived")
    finally:
        rcv.stop()
        # The folder is kept until the whole run ends: on ext4 without a journal (this machine kind),
        # deleting thousands of files makes every file created in the next ~30 s scan past the
        # "recently deleted" inodes (measured: ingest system time 3x, throughput halved), which
        # would slow whichever receiver happens to run next.
    return len(files) / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=5, help="passes per row; the median is reported")
    ap.add_argument("--workers", type=int, default=None, help="ingest.workers (default: the configuration's)")
    ap.add_argument("--only", default=",".join(RECEIVERS), help="receivers to run, comma-separated")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="data sets, comma-separated")
    ap.add_argument("--assocs", default=",".join(map(str, ASSOCS)), help="association counts, comma-separated")
    ap.add_argument("--cache", default="/tmp/dicomflow-bench-data", help="where generated data sets are kept")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a dicomflow setting for this run (dotted path, YAML value), e.g. ingest.workers=3; repeatable")
    args = ap.parse_args()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    ensure_netns("storescp/Orthanc bind every interface")
    receivers = [r for r in args.only.split(",") if r]
    names = [d for d in args.datasets.split(",") if d]
    assoc_counts = [int(a) for a in args.assocs.split(",") if a]
    load_start = os.getloadavg()
    log(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} ({os.cpu_count()} CPUs)")
    data = {n: dataset(Path(args.cache), n) for n in names}
    scratch = Path(tempfile.mkdtemp(prefix="dicomflow-bench-"))
    rows: dict[str, dict[str, float]] = {}
    try:
        for name in names:
            for assocs in assoc_counts:
                key = f"{name}/{assocs}"
                samples: dict[str, list[float]] = {r: [] for r in receivers}
                for p in range(args.passes):
                    # Interleaved, so a burst of outside load hits every receiver alike, and rotated, so no
                    # receiver is always the first after the previous row.
                    for r in receivers[p % len(receivers):] + receivers[:p % len(receivers)]:
                        rate = one_pass(r, data[name], assocs, scratch, args.workers, overrides)
                        samples[r].append(rate)
                        log(f"{key:<12} pass {p + 1} {r:<10} {rate:8.1f} inst/s  (load {os.getloadavg()[0]:.2f})")
                rows[key] = {r: round(statistics.median(v), 1) for r, v in samples.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load_end = os.getloadavg()
    out: dict = {"unit": "instances/s (median)", "passes": args.passes, "cpus": os.cpu_count(),
                 "ingest_workers": args.workers or "config default", "settings": overrides,
                 "load_avg_start": [round(x, 2) for x in load_start], "load_avg_end": [round(x, 2) for x in load_end],
                 "rows": rows}
    print(f"\n{'row':<12} " + " ".join(f"{r:>10}" for r in receivers) + "  vs_orthanc vs_storescp")
    for key, row in rows.items():
        ratios = {}
        for peer in ("orthanc", "storescp", "dicomflow-pynetdicom"):
            if "dicomflow" in row and peer in row and row[peer]:
                ratios[f"vs_{peer}"] = round(row["dicomflow"] / row[peer], 2)
        row.update(ratios)
        print(f"{key:<12} " + " ".join(f"{row[r]:>10.1f}" for r in receivers) + "  "
              + " ".join(f"{ratios.get(f'vs_{p}', float('nan')):>10.2f}" for p in ("orthanc", "storescp")))
    for peer in ("orthanc", "storescp"):
        vals = [row[f"vs_{peer}"] for row in rows.values() if f"vs_{peer}" in row]
        if vals:
            out[f"vs_{peer}_min"] = min(vals)
    print(f"load average: start {load_start[0]:.2f}, end {load_end[0]:.2f} (1-minute; {os.cpu_count()} CPUs, shared)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
