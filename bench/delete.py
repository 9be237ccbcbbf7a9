"""Delete throughput: one study of ``--instances`` instances (default 2,000; 64x64 CT, 4 series) deleted
with one DICOMweb ``DELETE /studies/{s}`` from ``dicomflow run`` (filesystem objects, SQLite catalogue,
one dicom.deleted event per instance published before the 204), against Orthanc 1.10's
``DELETE /studies/{id}`` of the same study (its REST API; the study sent with storescu to both).

The figure is the wall time of the DELETE request alone (the study is fully stored first: the catalogue,
or Orthanc's /studies/{id}, lists every instance). ``vs_orthanc_ratio`` = dicomflow instances/s / Orthanc's
(higher: dicomflow faster). Both share this machine's CPUs: compare the figures of one run with each other.
As root it re-runs itself in a private network namespace (Orthanc binds every interface). Progress on
stderr; the last line of stdout is one JSON object.

    .venv/bin/python bench/delete.py [--instances 2000] [--series 4] [--skip-orthanc]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from bench._support import ensure_netns, log, orthanc_config, stop_group  # noqa: E402
from dicomflow.natsserver import free_port  # noqa: E402
from dicomflow.synthetic import write_study  # noqa: E402

SEND_ENV = {**os.environ, "TCP_NODELAY": "1"}


def http(method: str, url: str, body: bytes | None = None, timeout: float = 600) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.3)


def storescu(folder: Path, port: int, called: str) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(["storescu", "-aec", called, "127.0.0.1", str(port), "+sd", str(folder)],
                         capture_output=True, text=True, env=SEND_ENV, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"storescu to {called} failed: {res.stderr[-2000:]}")
    return time.perf_counter() - t0


def bench_dicomflow(work: Path, folder: Path, study_uid: str, n: int) -> dict:
    web_port, dicom_port = free_port(), free_port()
    tree = {"data_dir": str(work / "data"), "nats": {"port": free_port(), "monitor_port": 0},
            "ingest": {"port": dicom_port, "workers": 1}, "store": {"workers": 1},
            "telemetry": {"metrics_port": 0}, "web": {"port": web_port}}
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "dicomflow.yaml"
    conf.write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
    proc = subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(conf), "run"], cwd=REPO, env=env,
                            stdout=open(work / "dicomflow.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{web_port}/dicom-web"
    try:
        wait_until(lambda: (work / "data" / "run" / "ready").exists() or proc.poll() is not None, 120,
                   "dicomflow run")
        if proc.poll() is not None:
            raise RuntimeError(f"dicomflow run exited: see {work / 'dicomflow.log'}")
        log(f"dicomflow: sending {n} instances")
        send_s = storescu(folder, dicom_port, "DICOMFLOW")

        def count() -> int:
            status, body = http("GET", f"{base}/studies?StudyInstanceUID={study_uid}")
            found = json.loads(body) if status == 200 and body else []
            return found[0]["00201208"]["Value"][0] if found else 0
        wait_until(lambda: count() == n, 600, f"{n} instances stored in dicomflow")
        objects = sum(1 for p in (work / "data" / "objects").rglob("*") if p.is_file() and len(p.name) == 64)
        log(f"dicomflow: DELETE /studies/{study_uid}")
        t0 = time.perf_counter()
        status, body = http("DELETE", f"{base}/studies/{study_uid}")
        took = time.perf_counter() - t0
        if status != 204:
            raise RuntimeError(f"dicomflow DELETE answered {status}: {body[:500]!r}")
        left = sum(1 for p in (work / "data" / "objects").rglob("*") if p.is_file() and len(p.name) == 64)
        return {"send_s": round(send_s, 2), "delete_s": round(took, 3), "instances_per_s": round(n / took, 1),
                "objects_before": objects, "objects_after": left, "after_status": count()}
    finally:
        stop_group(proc, 60)


def bench_orthanc(work: Path, folder: Path, study_uid: str, n: int) -> dict:
    http_port, dicom_port = free_port(), free_port()
    conf = orthanc_config(work, http_port, dicom_port)
    proc = subprocess.Popen(["Orthanc", conf], stdout=open(work / "orthanc.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=SEND_ENV)
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_until(lambda: http("GET", f"{base}/system")[0] == 200, 60, "Orthanc")
        log(f"Orthanc: sending {n} instances")
        send_s = storescu(folder, dicom_port, "ORTHANC")
        status, body = http("POST", f"{base}/tools/lookup", study_uid.encode())
        [found] = [r for r in json.loads(body) if r["Type"] == "Study"]
        stats = json.loads(http("GET", f"{base}/studies/{found['ID']}/statistics")[1])
        if int(stats["CountInstances"]) != n:
            raise RuntimeError(f"Orthanc holds {stats['CountInstances']} of {n} instances")
        log(f"Orthanc: DELETE /studies/{found['ID']}")
        t0 = time.perf_counter()
        status, body = http("DELETE", f"{base}/studies/{found['ID']}")
        took = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"Orthanc DELETE answered {status}: {body[:500]!r}")
        return {"send_s": round(send_s, 2), "delete_s": round(took, 3), "instances_per_s": round(n / took, 1)}
    finally:
        stop_group(proc, 60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=2000, help="instances in the study (default 2000)")
    ap.add_argument("--series", type=int, default=4, help="series in the study (default 4)")
    ap.add_argument("--skip-orthanc", action="store_true", help="dicomflow only (no baseline)")
    args = ap.parse_args()
    if not args.skip_orthanc:
        ensure_netns("Orthanc binds every interface")
    with tempfile.TemporaryDirectory(prefix="bench-delete-") as tmp:
        work = Path(tmp)
        study_uid, _ = write_study(work / "study", args.instances, series=args.series)
        out = {"bench": "delete", "instances": args.instances, "series": args.series,
               "dicomflow": bench_dicomflow(work / "dicomflow", work / "study", study_uid, args.instances)}
        if not args.skip_orthanc:
            out["orthanc"] = bench_orthanc(work / "orthanc", work / "study", study_uid, args.instances)
            out["vs_orthanc_ratio"] = round(out["dicomflow"]["instances_per_s"] / out["orthanc"]["instances_per_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
