"""A retrieve's memory is bounded whatever the instance's size: a 1 GiB instance streamed over WADO-RS by a real
`dicomflow web` process raises its peak RSS by a few MiB, not by the instance (measured from /proc)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import blake3
import requests

from dicomflow.natsserver import free_port
from dicomflow.synthetic import ct_instance, new_uid
from shared.catalogue.entry import InstanceFacts, entry_from_model
from shared.catalogue.open import open_catalogue
from shared.config import load_config
from shared.dicom.json_model import json_model
from shared.storage.objectstore import Backends, content_digest
from tests.helpers import REPO, encode, proc_status, wait_for, write_config

EXPLICIT = "1.2.840.10008.1.2.1"
PIXELS = 1024 ** 3


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory of process ``pid`` in MiB."""
    return proc_status(pid, "VmHWM") / 1024


def sparse_instance(objects, size: int) -> tuple[object, bytes, str, int]:
    """A CT instance whose pixel data is ``size`` zero bytes, written as a sparse object file; its digest."""
    ds = ct_instance(new_uid(), new_uid(), 1, rows=8, cols=8)
    del ds.PixelData
    head = encode(ds) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, size)
    hasher = blake3.blake3(head, max_threads=blake3.blake3.AUTO)
    zeros = bytes(64 * 1024 * 1024)
    for _ in range(size // len(zeros)):
        hasher.update(zeros)
    digest = hasher.hexdigest()
    objects.put(digest, head)  # then grown to its full size without writing the zeros
    with open(objects.path(digest), "r+b") as f:
        f.truncate(len(head) + size)
    return ds, head, digest, len(head) + size


def test_wado_retrieve_of_a_1_gib_instance_stays_within_64_mib(tmp_path):
    tree = {"data_dir": str(tmp_path / "data"), "telemetry": {"metrics_port": 0},
            "web": {"port": free_port()}, "access": {"anonymous_tenant": "a"}}
    config_path = write_config(tmp_path, tree)
    config = load_config(str(config_path), environ={})
    backends = Backends(config)
    objects = backends.get("local")
    ds, head, digest, total = sparse_instance(objects, PIXELS)
    small = ct_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, 2, rows=8, cols=8)
    catalogue = open_catalogue("", config.data_path())
    entries = [entry_from_model(json_model(head, EXPLICIT, total=total),
                                InstanceFacts("a", EXPLICIT, digest, total, "default", ("local",), "M", "2026", "2026"))]
    raw = encode(small)
    objects.put(content_digest(raw), raw)
    entries.append(entry_from_model(json_model(raw, EXPLICIT), InstanceFacts(
        "a", EXPLICIT, content_digest(raw), len(raw), "default", ("local",), "M", "2026", "2026")))
    catalogue.record_batch(entries)
    catalogue.close()
    backends.close()

    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
    proc = subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(config_path), "web"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{tree['web']['port']}/dicom-web/studies/{ds.StudyInstanceUID}/series/" \
               f"{ds.SeriesInstanceUID}/instances/"

        def answers() -> bool:
            try:
                return requests.get(base + small.SOPInstanceUID, timeout=5).status_code == 200
            except requests.ConnectionError:
                return False
        wait_for(answers, 30, what="dicomflow web")
        before = peak_rss_mib(proc.pid)
        received = 0
        with requests.get(base + ds.SOPInstanceUID, headers={"Accept": 'multipart/related; type="application/dicom"; '
                                                                       "transfer-syntax=*"},
                          stream=True, timeout=120) as res:
            assert res.status_code == 200
            for chunk in res.iter_content(1024 * 1024):
                received += len(chunk)
        assert received > PIXELS  # the whole instance (plus its file meta and the multipart framing) arrived
        grew = peak_rss_mib(proc.pid) - before
        print(f"peak RSS {before:.0f} MiB before, +{grew:.1f} MiB while streaming a {total / 2**30:.1f} GiB instance")
        assert grew < 64, grew
    finally:
        proc.terminate()
        proc.wait(30)
