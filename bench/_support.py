"""What the benchmark scripts share (not a benchmark itself: tests/test_bench_scripts.py skips _-names)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

NETNS_FLAG = "DICOMFLOW_BENCH_NETNS"


def log(msg: str) -> None:
    """Progress on stderr: stdout ends with the one JSON line."""
    print(msg, file=sys.stderr, flush=True)


def ensure_netns(why_needed: str) -> None:
    """Re-run this script in a private network namespace when we are root and not in one yet
    (``why_needed``: which peer binds every interface, said when it cannot be done)."""
    if os.environ.get(NETNS_FLAG):
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if os.geteuid() != 0 or not shutil.which("unshare"):
        log(f"not root: running in the host network namespace ({why_needed})")
        return
    os.environ[NETNS_FLAG] = "1"
    os.execvp("unshare", ["unshare", "-n", "--", sys.executable, *sys.argv])


def stop_group(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGTERM a process started in a session of its own, and its children; SIGKILL after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


ORTHANC_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def orthanc_config(work: Path, http_port: int, dicom_port: int) -> str:
    """Write the configuration of a fresh Orthanc with its DICOMweb plugin into ``work``; its path."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    conf = {"Name": "bench", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
            "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "Plugins": [ORTHANC_PLUGIN],
            "RemoteAccessAllowed": False, "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (work / "orthanc.json").write_text(json.dumps(conf))
    return str(work / "orthanc.json")
