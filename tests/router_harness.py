"""Real parts for the router tests: dcmtk storescp gateways, an ingest, router members, a study sender."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nats
import yaml

from dicomflow.natsserver import free_port, wait_port
from dicomflow.synthetic import write_study
from tests.helpers import REPO, dataset_bytes, make_config


class Gateway:
    """A dcmtk storescp writing the received bytes as they are (+B) into its own folder."""

    def __init__(self, tmp: Path, name: str, port: int | None = None):
        self.name = name
        self.port = port or free_port()
        self.dir = tmp / f"gw-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = tmp / f"gw-{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Gateway:
        self.proc = subprocess.Popen(["storescp", "-aet", self.name, "+B", "-od", str(self.dir), str(self.port)],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "TCP_NODELAY": "1"})
        wait_port("127.0.0.1", self.port, 15)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def received(self) -> dict[str, bytes]:
        """SOP Instance UID -> data set bytes of every complete file received."""
        out = {}
        for f in self.dir.iterdir():
            if not f.is_file() or "." not in f.name:
                continue
            try:
                out[f.name.split(".", 1)[1]] = dataset_bytes(f)
            except Exception:
                continue  # a file being written right now
        return out

    def target(self, **kw) -> dict:
        return {"kind": "dicom", "host": "127.0.0.1", "port": self.port, "ae_title": self.name, "timeout_s": 20, **kw}


class Cluster:
    """nats-server (given), one ingest process, router members, a config file the routers reload."""

    def __init__(self, tmp: Path, nats_url: str, router: dict, rules: str):
        self.tmp = tmp
        self.nats_url = nats_url
        self.rules_path = tmp / "rules.yaml"
        self.rules_path.write_text(rules)
        base = {"rules_file": str(self.rules_path), "reload_interval_s": 0.5, "scan_interval_s": 0.2,
                "completion": {"quiet_s": 1.5},
                "forward": {"batch": 16, "backoff_initial_s": 0.2, "backoff_max_s": 1.0, "max_attempts": 1000,
                            "probe_interval_s": 0.5},
                "group": {"ack_wait_s": 10, "pinned_timeout_s": 4, "member_ttl_s": 2, "heartbeat_s": 0.5}}
        self.tree = make_config(tmp, nats_url, router={**base, **router})
        self.config_path = tmp / "dicomflow.yaml"
        self.write()
        self.port = self.tree["ingest"]["port"]
        self.procs: list[subprocess.Popen] = []
        self.routers: list[subprocess.Popen] = []

    def write(self) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.tree))
        tmp.replace(self.config_path)  # atomic: a reloading router never reads half a file

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
        proc = subprocess.Popen([sys.executable, "-m", "dicomflow", "--config", str(self.config_path), *args],
                                cwd=REPO, env=env, stdout=open(self.tmp / f"{name}.log", "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_ingest(self) -> None:
        self._spawn("ingest", "ingest", "--single")
        wait_port("127.0.0.1", self.port, 60)

    def start_router(self) -> subprocess.Popen:
        proc = self._spawn(f"router-{len(self.routers)}", "router")
        self.routers.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(self.tmp.glob("*.log")))

    def send(self, folders: list[Path], parallel: int = 6, calling_ae: str = "MODALITY") -> None:
        """Send each folder with its own storescu association, several at once; every send must succeed."""
        def one(folder: Path) -> None:
            res = subprocess.run(["storescu", "-aet", calling_ae, "-aec", "DICOMFLOW", "127.0.0.1", str(self.port),
                                  "+sd", str(folder)], capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "TCP_NODELAY": "1"})
            assert res.returncode == 0, res.stderr

        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(one, folders))


def make_studies(root: Path, count: int, instances: int, pick=None) -> dict[str, list[Path]]:
    """``count`` synthetic studies (UID -> files), optionally only UIDs ``pick(uid)`` accepts."""
    out: dict[str, list[Path]] = {}
    i = 0
    while len(out) < count:
        folder = root / f"s{i:03d}"
        i += 1
        uid, files = write_study(folder, instances, rows=16, cols=16)
        if pick is not None and not pick(uid):
            for f in files:
                f.unlink()
            folder.rmdir()
            continue
        out[uid] = files
    return out


def split_folder(files: list[Path], root: Path, parts: int) -> list[Path]:
    """Copy a study's files into ``parts`` folders (to send it in pieces)."""
    folders = []
    for k in range(parts):
        folder = root / f"part{k}"
        folder.mkdir(parents=True, exist_ok=True)
        folders.append(folder)
    for n, f in enumerate(sorted(files)):
        shutil.copyfile(f, folders[n % parts] / f.name)
    return folders


def where(gateways: list[Gateway], studies: dict[str, list[Path]], sop_of: dict[Path, str]) -> dict[str, dict[str, int]]:
    """Study UID -> {gateway name: instances of it received there}."""
    study_of = {}
    for uid, files in studies.items():
        for f in files:
            study_of[sop_of[f]] = uid
    out: dict[str, dict[str, int]] = {uid: {} for uid in studies}
    for gw in gateways:
        for sop in gw.received():
            uid = study_of.get(sop)
            if uid:
                out[uid][gw.name] = out[uid].get(gw.name, 0) + 1
    return out


def events_on(url: str, subject: str, stream: str = "DICOM_EVENTS") -> int:
    """How many messages the stream holds on ``subject`` (wildcards allowed)."""
    from shared.bus.jetstream import api

    async def go() -> int:
        nc = await nats.connect(url)
        try:
            info = await api(nc, f"STREAM.INFO.{stream}", {"subjects_filter": subject})
            return sum((info["state"].get("subjects") or {}).values())
        finally:
            await nc.close()

    return asyncio.run(go())


def study_state(url: str, study_uid: str) -> dict | None:
    """The router's KV state of a study (None before it exists)."""
    import json

    from shared.contract.uids import uid_token

    async def go():
        nc = await nats.connect(url)
        try:
            try:
                kv = await nc.jetstream().key_value("router-studies")
            except Exception:
                return None  # the router has not created it yet
            try:
                entry = await kv.get(uid_token(study_uid))
            except Exception:
                return None
            return json.loads(entry.value) if entry.value else None
        finally:
            await nc.close()

    return asyncio.run(go())


__all__ = ["Cluster", "Gateway", "make_studies", "split_folder", "where", "events_on", "study_state"]


def assigned(url: str, group: str = "gateways") -> dict[str, str]:
    """The sticky assignments of a group: StudyInstanceUID -> target."""
    async def go() -> dict[str, str]:
        nc = await nats.connect(url)
        try:
            try:
                kv = await nc.jetstream().key_value("router-assign")
                keys = await kv.keys()
            except Exception:
                return {}
            out = {}
            for k in keys:
                g, _, token = k.partition(".")
                if g == group:
                    out[token.replace("_", ".")] = (await kv.get(k)).value.decode()
            return out
        finally:
            await nc.close()

    return asyncio.run(go())


class StowReceiver:
    """A minimal DICOMweb STOW-RS endpoint (POST /studies, multipart/related) over real HTTP on loopback."""

    def __init__(self):
        import http.server

        self.received: dict[str, bytes] = {}
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                import email.parser
                import io

                from pydicom import dcmread

                body = self.rfile.read(int(self.headers["Content-Length"]))
                ctype = self.headers["Content-Type"]
                if self.path != "/dicom-web/studies" or "multipart/related" not in ctype:
                    self.send_response(415)
                    self.end_headers()
                    return
                msg = email.parser.BytesParser().parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + body)
                for part in msg.walk():
                    if part.get_content_type() == "application/dicom":
                        raw = part.get_payload(decode=True)
                        ds = dcmread(io.BytesIO(raw), stop_before_pixels=True)
                        meta_len = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
                        outer.received[str(ds.SOPInstanceUID)] = raw[meta_len:]
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        import threading

        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def target_up(url: str, target: str) -> bool | None:
    """The router's shared view of a target's health (None before any member probed it)."""
    import json

    async def go():
        nc = await nats.connect(url)
        try:
            try:
                kv = await nc.jetstream().key_value("router-health")
                entry = await kv.get(target)
            except Exception:
                return None
            return bool(json.loads(entry.value)["up"]) if entry.value else None
        finally:
            await nc.close()

    return asyncio.run(go())


def last_event(url: str, subject: str, stream: str = "DICOM_EVENTS") -> dict:
    """The JSON body of the last message on ``subject``."""
    import base64
    import json

    from shared.bus.jetstream import api

    async def go() -> dict:
        nc = await nats.connect(url)
        try:
            resp = await api(nc, f"STREAM.MSG.GET.{stream}", {"last_by_subj": subject})
            return json.loads(base64.b64decode(resp["message"]["data"]))
        finally:
            await nc.close()

    return asyncio.run(go())
