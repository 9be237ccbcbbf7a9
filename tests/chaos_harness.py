"""The shell of the chaos suite: the real stack as a user runs it, a modality-like sender, a killer, and the
read-back that feeds the verdict of tests/chaos_core.py.

- The stack is ``dicomflow run`` (tests.helpers.Stack) with ``ingest.workers`` receivers, ``store.workers``
  store workers and a router forwarding every instance to a real dcmtk ``storescp`` (so a router killed while it
  forwards is covered), all on the embedded nats-server.
- The sender is a modality: several pynetdicom associations in threads, each sending whole studies, paced over
  the window; an instance answered other than 0x0000 (or whose association broke) is sent again, on a new
  association when needed, until it is acknowledged. It records when each SOP was acknowledged.
- The killer SIGKILLs processes by pid, found from ``dicomflow run``'s pid through /proc (its children: the
  nats-server, ``dicomflow ingest`` and its receivers, store workers, the router), at the moments of the seed's
  schedule; ``dicomflow run`` restarts them, as it would in production.
- A watcher polls the catalogue and notes when each SOP first appears there (for the recovery times).
- With a Ceph OSD among the kinds, staging and placements are in size-2 pools of a 2-OSD cluster
  (:class:`CephPools`); an OSD killed is started again a second later, and every stored object is also read
  straight from its pool through librados.
- With web replicas among the kinds, ``dicomflow run`` serves DICOMweb from two processes on one socket and
  clients (:class:`Downloader`) retrieve whole studies throughout; a replica is stopped, the connections it holds
  noted, then killed, and each download attempt is judged by whether the killed replica held its connection.
- Afterwards: the catalogue rows (``dicomflow studies --json`` and the catalogue), the bytes through
  ``dicomflow export``, the files storescp received, and the events on ``dicom.study.complete`` / ``updated``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nats
import yaml
from pydicom import dcmread

from dicomflow.natsserver import free_port, wait_port
from dicomflow.synthetic import write_study
from shared.storage.objectstore import content_digest
from tests.chaos_core import (
    CATALOGUE,
    NATS,
    NATS_LEADER,
    NATS_MEMBER,
    OSD,
    RECEIVER,
    ROUTER,
    STORE,
    WEB,
    Completion,
    Download,
    Kill,
    SentInstance,
    StoredInstance,
    Verdict,
    judge_downloads,
    kill_schedule,
    recovery_times,
    verdict,
)
from tests.helpers import Stack, dataset_bytes, make_config, run_cli

log = logging.getLogger("chaos")


# --- processes of a running `dicomflow run` ------------------------------------------------------------------


def _ppid_and_argv(pid: int) -> tuple[int, list[str]] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie not yet reaped by the supervisor: already dead
        return None
    return int(fields[1]), [a.decode(errors="replace") for a in argv if a]


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``, in pid order."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _ppid_and_argv(int(entry))
            if info and info[0] == pid:
                out.append(int(entry))
    return sorted(out)


def role(argv: list[str]) -> str | None:
    """The kind of a process of the stack from its command line (None: not one the killer aims at)."""
    if argv and Path(argv[0]).name == "nats-server":
        return NATS
    if "dicomflow" in argv and len(argv) > 2:
        if "web" in argv:
            return WEB
        if "ingest" in argv:
            return RECEIVER if "--single" in argv else "ingest"
        if "store" in argv:
            return STORE
        if "router" in argv:
            return ROUTER
    return None


def stack_processes(run_pid: int) -> dict[str, list[int]]:
    """The stack's processes by kind. With several receivers the ingest is their supervisor and they are its
    children; with one, the ingest process is the receiver."""
    found: dict[str, list[int]] = {}
    for pid in children(run_pid):
        info = _ppid_and_argv(pid)
        kind = role(info[1]) if info else None
        if kind == "ingest":
            receivers = [c for c in children(pid) if (i := _ppid_and_argv(c)) and role(i[1]) == RECEIVER]
            found.setdefault(RECEIVER, []).extend(receivers or [pid])
        elif kind:
            found.setdefault(kind, []).append(pid)
    return found


# --- the sender --------------------------------------------------------------------------------------------


@dataclass
class SendLog:
    """What the sender knows: when each SOP was acknowledged, and every status or failure it saw."""

    acked_at: dict[str, float] = field(default_factory=dict)
    outcomes: Counter = field(default_factory=Counter)
    attempts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Sender:
    """A modality: ``associations`` threads, each sending whole studies from a shared list, paced so that the
    instances spread over ``window_s``; each instance is sent again until it is answered 0x0000 (or
    ``deadline_s`` passes)."""

    def __init__(self, port: int, ae_title: str, studies: list[list[Path]], associations: int, window_s: float,
                 deadline_s: float):
        self.port, self.ae_title = port, ae_title
        self.studies = list(studies)
        self.associations = associations
        self.total = sum(len(s) for s in studies)
        self.interval = window_s / max(1, self.total)
        self.deadline_s = deadline_s
        self.log = SendLog()
        self._next = 0
        self._queue_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.t0 = 0.0

    def start(self) -> None:
        self.t0 = time.time()
        for i in range(self.associations):
            t = threading.Thread(target=self._run, name=f"modality-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def join(self) -> None:
        for t in self._threads:
            t.join()

    def _slot(self) -> float:
        """The moment the next instance may go (the pacing shared by every association)."""
        with self._queue_lock:
            at = self.t0 + self._next * self.interval
            self._next += 1
        return at

    def _take_study(self) -> list[Path] | None:
        with self._queue_lock:
            return self.studies.pop(0) if self.studies else None

    def _run(self) -> None:
        from pydicom.uid import ExplicitVRLittleEndian
        from pynetdicom import AE
        from pynetdicom.sop_class import CTImageStorage

        ae = AE(ae_title="CHAOSMOD")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = None
        end = self.t0 + self.deadline_s
        try:
            while (study := self._take_study()) is not None:
                for path in study:
                    ds = dcmread(path)
                    sop = str(ds.SOPInstanceUID)
                    delay = self._slot() - time.time()
                    if delay > 0:
                        time.sleep(delay)
                    backoff = 0.2
                    while time.time() < end:
                        if assoc is None or not assoc.is_established:
                            assoc = ae.associate("127.0.0.1", self.port, ae_title=self.ae_title)
                            if not assoc.is_established:
                                self._note("association refused or failed")
                                assoc = None
                                time.sleep(backoff)
                                backoff = min(backoff * 2, 2.0)
                                continue
                        try:
                            status = assoc.send_c_store(ds)
                        except Exception as exc:  # the peer went away mid-request
                            status = None
                            self._note(f"send failed: {type(exc).__name__}")
                        with self.log.lock:
                            self.log.attempts += 1
                        code = int(status.Status) if status is not None and "Status" in status else None
                        if code == 0x0000:
                            with self.log.lock:
                                self.log.acked_at.setdefault(sop, time.time())
                            self._note("0x0000")
                            break
                        self._note(f"0x{code:04X}" if code is not None else "no answer (association lost)")
                        if not assoc.is_established:
                            assoc = None
                        time.sleep(backoff)
                        backoff = min(backoff * 2, 2.0)
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()

    def _note(self, what: str) -> None:
        with self.log.lock:
            self.log.outcomes[what] += 1


# --- a DICOMweb client downloading while web replicas are killed -------------------------------------------


class _NarrowConnection(http.client.HTTPConnection):
    """An HTTP connection with a small receive buffer: with the client reading slowly the server is still writing
    the answer (not done with it into the kernel's buffers) when its process is killed."""

    def connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.settimeout(self.timeout)
        sock.connect((self.host, self.port))
        self.sock = sock


def _part10_digest(body: bytes) -> tuple[str, str]:
    """SOP UID and the digest of the data set bytes (after the file meta) of a Part-10 file's bytes."""
    import io

    ds = dcmread(io.BytesIO(body), stop_before_pixels=True)
    meta_len = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return str(ds.SOPInstanceUID), content_digest(body[meta_len:])


class Downloader:
    """``clients`` threads, each retrieving whole studies (WADO-RS, as stored) again and again over a fresh
    connection per attempt, reading slowly; a failed attempt is retried (a fresh connection, up to
    ``retries`` times) until the request is served. Records every attempt (:class:`Download`)."""

    ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'

    def __init__(self, port: int, prefix: str, studies, clients: int = 6, retries: int = 5,
                 chunk_pause_s: float = 0.01):
        self.port, self.prefix, self.studies = port, prefix, studies  # studies(): those worth asking for now
        self.clients, self.retries, self.chunk_pause_s = clients, retries, chunk_pause_s
        self.downloads: list[Download] = []
        self._lock = threading.Lock()
        self._next = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"downloader-{i}", daemon=True)
                         for i in range(clients)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _run(self, i: int) -> None:
        import random

        rng = random.Random(i)
        while not self._stop.is_set():
            choices = self.studies()
            if not choices:
                self._stop.wait(0.5)
                continue
            study = rng.choice(choices)
            with self._lock:
                request, self._next = self._next, self._next + 1
            for attempt in range(self.retries + 1):
                d = self._attempt(request, attempt, study)
                with self._lock:
                    self.downloads.append(d)
                if not d.error:
                    break
                time.sleep(0.2 * (attempt + 1))

    def _attempt(self, request: int, attempt: int, study: str) -> Download:
        conn = _NarrowConnection("127.0.0.1", self.port, timeout=30)
        port = 0
        try:
            conn.connect()
            port = conn.sock.getsockname()[1]
            conn.request("GET", f"{self.prefix}/studies/{study}", headers={"Accept": self.ACCEPT})
            res = conn.getresponse()
            if res.status != 200:
                return Download(request, attempt, port, error=f"HTTP {res.status}: {res.read()[:200]!r}")
            boundary = res.getheader("Content-Type", "").split("boundary=")[1].split(";")[0].strip('"').encode()
            body = bytearray()
            while chunk := res.read(32768):
                body += chunk
                time.sleep(self.chunk_pause_s)
            if not bytes(body).rstrip().endswith(b"--" + boundary + b"--"):
                return Download(request, attempt, port, error=f"answer cut short after {len(body)} bytes")
            parts = tuple(_part10_digest(p.partition(b"\r\n\r\n")[2][:-2])
                          for p in bytes(body).split(b"--" + boundary)[1:-1])
            return Download(request, attempt, port, parts=parts)
        except Exception as exc:  # reset, cut short (IncompleteRead), refused, timed out
            return Download(request, attempt, port, error=f"{type(exc).__name__}: {exc}"[:200])
        finally:
            conn.close()


def _client_ports(pid: int, server_port: int) -> set[int]:
    """The remote (client) ports of the TCP connections to ``server_port`` that process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            local_port, remote_port = int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)
            if f[9] in inodes and local_port == server_port and remote_port:
                ports.add(remote_port)
    return ports


# --- the killer --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KillRecord:
    """A kill made: when (wall clock), what, which pid; ``pid`` None when no process of the kind was alive."""

    at: float
    kind: str
    pid: int | None


class Killer:
    """SIGKILLs the stack's processes at the schedule's moments (from ``t0``), through ``stack.kill``."""

    def __init__(self, stack: ChaosStack, schedule: list[Kill]):
        self.stack = stack
        self.schedule = schedule
        self.done: list[KillRecord] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="killer", daemon=True)
        self.t0 = 0.0

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        for kill in self.schedule:
            if self._stop.wait(max(0.0, self.t0 + kill.at_s - time.time())):
                return
            try:
                pid = self.stack.kill(kill.kind, kill.pick)
            except Exception as exc:  # e.g. no stream leader known while the cluster elects one
                log.warning("kill of %s failed: %s", kill.kind, exc)
                pid = None
            self.done.append(KillRecord(time.time(), kill.kind, pid))
            log.info("killed %s pid %s", kill.kind, pid)


# --- the catalogue watcher ---------------------------------------------------------------------------------


class Watcher:
    """Polls the catalogue every ``interval`` s and notes when each SOP was first seen there."""

    def __init__(self, catalogue_url: str, data_dir: Path, studies: list[str], interval: float = 0.3):
        self.url, self.data_dir, self.studies, self.interval = catalogue_url, data_dir, studies, interval
        self.seen_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="catalogue-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from shared.catalogue.open import open_catalogue

        catalogue = None
        while not self._stop.wait(self.interval):
            try:
                if catalogue is None:
                    catalogue = open_catalogue(self.url, self.data_dir)
                now = time.time()
                for study in self.studies:
                    for row in catalogue.instances(None, study):
                        self.seen_at.setdefault(row["sop_uid"], now)
            except Exception as exc:  # not created yet, or the database is being restarted
                log.debug("catalogue poll: %s", exc)
                if catalogue is not None:
                    try:
                        catalogue.close()
                    except Exception:
                        pass
                    catalogue = None
        if catalogue is not None:
            catalogue.close()


# --- the stacks -------------------------------------------------------------------------------------------


def _sigkill(pids: list[int], pick: int) -> int | None:
    """SIGKILL one of ``pids`` (index ``pick`` mod their number); the pid, or None when none was alive."""
    if not pids:
        return None
    pid = pids[pick % len(pids)]
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    return pid


class Catalogue:
    """The catalogue's PostgreSQL server, restarted after a kill as its pod or unit would be."""

    def __init__(self, work: Path):
        from tests.pg_cluster import PgCluster

        self.pg = PgCluster(Path(tempfile.mkdtemp(prefix="dicomflow-chaos-pg-"))).start()
        self.url = self.pg.dsn
        self._restarts: list[threading.Thread] = []

    def postmaster(self) -> int | None:
        try:
            return int((self.pg.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self, pick: int) -> int | None:
        """SIGKILL the postmaster (its backends notice and exit); start the server again a second later."""
        pid = self.postmaster()
        if pid is None or _sigkill([pid], pick) is None:
            return None
        t = threading.Thread(target=self._restart, name="catalogue-restart", daemon=True)
        t.start()
        self._restarts.append(t)
        return pid

    def _restart(self) -> None:
        time.sleep(1.0)
        for _ in range(60):  # orphaned backends may hold the shared memory for a moment
            res = self.pg._run(self.pg_ctl(), "-D", str(self.pg.data), "-l", str(self.pg.root / "log"), "-w", "-t",
                               "30", "start", check=False)
            if res.returncode == 0:
                return
            time.sleep(0.5)
        log.error("the catalogue's PostgreSQL did not start again")

    @staticmethod
    def pg_ctl() -> str:
        from tests.pg_cluster import _bin

        return _bin("pg_ctl")

    def stop(self) -> None:
        for t in self._restarts:
            t.join(60)
        self.pg.stop()


class CephPools:
    """A 2-OSD Ceph cluster (bluestore: an OSD killed comes back with its data) with two size-2 pools, one for the
    ingest's staging and one for the store's placements, so each OSD holds a copy of everything and either may
    die mid-ingest (min_size 1). A killed OSD is started again a second later, as its unit or pod would be, and
    catches up from its peer."""

    POOL, STAGING = "chaos-instances", "chaos-staging"

    def __init__(self, work: Path):
        from tests.ceph_cluster import CephCluster

        self.cluster = CephCluster(Path(tempfile.mkdtemp(prefix="dicomflow-chaos-ceph-")), osds=2,
                                   bluestore={0, 1}, osd_gb=2, op_timeout_s=30).start()
        for pool in (self.POOL, self.STAGING):
            self.cluster.create_pool(pool, size=2)
        self._due: queue.Queue[tuple[float, int] | None] = queue.Queue()
        self._restarts = threading.Thread(target=self._restarter, name="osd-restarts", daemon=True)
        self._restarts.start()

    def storage(self) -> dict:
        """The ``storage`` section: staging and every placement in the size-2 pools."""
        rados = {"kind": "rados", "ceph_conf": str(self.cluster.conf), "op_timeout_s": 30}
        return {"staging": "ceph-staging",
                "backends": {"ceph-staging": {**rados, "pool": self.STAGING}, "ceph": {**rados, "pool": self.POOL}},
                "policies": {"default": {"placements": ["ceph"]}}, "default_policy": "default"}

    def kill(self, pick: int) -> int | None:
        """SIGKILL one live OSD without telling the mon (its peer reports it); start it again a second later."""
        live = sorted(self.cluster.osd_pids())
        if not live:
            return None
        osd = live[pick % len(live)]
        pid = self.cluster.kill_osd(osd, tell_mon=False)
        self._due.put((time.time() + 1.0, osd))
        return pid

    def _restarter(self) -> None:
        # One thread for every restart, living as long as the cluster: the daemons die with the thread that
        # started them (PR_SET_PDEATHSIG), so a short-lived thread per restart would take its OSD with it.
        while (item := self._due.get()) is not None:
            at, osd = item
            time.sleep(max(0.0, at - time.time()))
            try:
                self.cluster.start_osd(osd, wait=False)
            except Exception as exc:
                log.error("osd.%s did not start again: %s", osd, exc)

    def read_back(self, rows: list[StoredInstance]) -> dict[str, str]:
        """SOP UID -> digest of its object's bytes read straight from the placement pool through librados."""
        from shared.config import RadosBackendConfig
        from shared.storage.rados_store import RadosObjectStore

        self._wait_restarts()
        store = RadosObjectStore("chaos", RadosBackendConfig(ceph_conf=str(self.cluster.conf), pool=self.POOL,
                                                             op_timeout_s=60))
        out = {}
        try:
            for r in rows:
                try:
                    out[r.sop] = content_digest(store.get(r.digest))
                except Exception as exc:  # missing or corrupt: the verdict names it lost or corrupt
                    log.warning("rados read of %s (%s): %s", r.sop, r.digest, exc)
                    if "Corrupt" in type(exc).__name__:
                        out[r.sop] = "corrupt"
        finally:
            store.close()
        return out

    def _wait_restarts(self, timeout: float = 60) -> None:
        """Until every OSD killed is running and up again."""
        deadline = time.time() + timeout
        while not self._due.empty() and time.time() < deadline:
            time.sleep(0.2)
        try:
            self.cluster.wait_up(set(range(self.cluster.osds)), max(1.0, deadline - time.time()))
        except (TimeoutError, RuntimeError) as exc:
            log.error("OSDs after the kills: %s", exc)

    def stop(self) -> None:
        self._due.put(None)
        self._restarts.join(30)
        self.cluster.stop()


class ChaosStack:
    """What the killer and the run need of a stack: start, stop, kill a process by kind, run the CLI."""

    tree: dict
    config_path: Path
    data_dir: Path
    port: int
    ae_title: str
    nats_url: str
    catalogue: Catalogue | None = None
    ceph: CephPools | None = None
    cut_ports: set[int]  # client ports of the connections killed web replicas held

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def pids(self, kind: str) -> list[int]: ...

    def kill(self, kind: str, pick: int) -> int | None:
        """SIGKILL one process of ``kind``; its pid, or None when none was alive."""
        if kind == CATALOGUE:
            return self.catalogue.kill(pick) if self.catalogue else None
        if kind == OSD:
            return self.ceph.kill(pick) if self.ceph else None
        if kind == WEB:
            return self._kill_web(pick)
        return _sigkill(self.pids(kind), pick)

    def _kill_web(self, pick: int) -> int | None:
        """SIGKILL a web replica, noting the client connections it held: stopped first (SIGSTOP), so it accepts
        none between the note and the kill."""
        pids = self.pids(WEB)
        if not pids:
            return None
        pid = pids[pick % len(pids)]
        try:
            os.kill(pid, signal.SIGSTOP)
            ports = _client_ports(pid, self.tree["web"]["port"])
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        self.cut_ports |= ports
        log.info("web replica %s held connections from ports %s", pid, sorted(ports))
        return pid

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_cli(self.config_path, *args, check=check)

    def studies(self) -> list[dict]:
        return json.loads(self.cli("studies", "--json").stdout)


class EmbeddedStack(ChaosStack):
    """``dicomflow run`` as a user starts it (tests.helpers.Stack): it restarts what the killer kills."""

    def __init__(self, work: Path, tree: dict, catalogue: Catalogue | None = None, ceph: CephPools | None = None):
        if catalogue is not None:
            tree["catalogue"] = {"url": catalogue.url}
        if ceph is not None:
            tree["storage"] = ceph.storage()
        self.ceph = ceph
        self.inner = Stack(work, tree)
        self.tree, self.config_path, self.data_dir = tree, self.inner.config_path, self.inner.data_dir
        self.port, self.ae_title = self.inner.port, self.inner.ae_title
        self.nats_url = f"nats://127.0.0.1:{tree['nats']['port']}"
        self.catalogue = catalogue
        self.cut_ports = set()

    def start(self) -> None:
        self.inner.start()

    def stop(self) -> None:
        self.inner.stop()
        if self.catalogue:
            self.catalogue.stop()
        if self.ceph:
            self.ceph.stop()

    def pids(self, kind: str) -> list[int]:
        assert self.inner.proc is not None
        return stack_processes(self.inner.proc.pid).get(kind, [])


class ComposeStack(ChaosStack):
    """The services one by one as compose (or Kubernetes) runs them, each restarted when it dies (compose's
    ``restart: always``, a pod's restart), by the one supervisor of shared/supervisor.py: a 3-node NATS cluster
    (streams with 3 replicas), ``dicomflow ingest`` (with its receivers), ``dicomflow store`` workers and
    ``dicomflow router``, the catalogue in PostgreSQL."""

    def __init__(self, work: Path, tree: dict, store_workers: int, catalogue: Catalogue,
                 ceph: CephPools | None = None):
        from tests.nats_cluster import NatsCluster

        self.work = work
        if ceph is not None:
            tree["storage"] = ceph.storage()
        self.ceph = ceph
        self.cluster = NatsCluster(work, 3)
        self.catalogue = catalogue
        tree["nats"]["url"] = self.cluster.url
        tree["stream"]["replicas"] = 3
        tree["catalogue"] = {"url": catalogue.url}
        self.tree = tree
        self.config_path = work / "dicomflow.yaml"
        self.config_path.write_text(yaml.safe_dump(tree))
        self.data_dir = Path(tree["data_dir"])
        self.port, self.ae_title = tree["ingest"]["port"], tree["ingest"].get("ae_title", "DICOMFLOW")
        self.nats_url = self.cluster.urls[0]
        self.store_workers = store_workers
        self.cut_ports = set()
        self.supervisor = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def start(self) -> None:
        from shared.supervisor import ChildSpec, Supervisor

        self.supervisor = Supervisor(logger=logging.getLogger("chaos.compose"))
        for server in self.cluster.servers:
            self.supervisor.start(ChildSpec(f"nats-{server.name}", server.argv(), log_file=server.log_file))
        asyncio.run(self.cluster._wait_ready(60))
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
        base = [sys.executable, "-m", "dicomflow", "--config", str(self.config_path)]
        services = [("ingest", "ingest"), *((f"store-{i}", "store") for i in range(self.store_workers)),
                    ("router", "router")]
        for name, command in services:
            self.supervisor.start(ChildSpec(name, [*base, command], env=env, log_file=self.work / f"{name}.log",
                                            stop_timeout_s=30))
        # Restarts are made from this thread, which lives as long as the stack (PR_SET_PDEATHSIG).
        self._poller = threading.Thread(target=self._supervise, name="compose-supervisor", daemon=True)
        self._poller.start()
        wait_port("127.0.0.1", self.port, 90)

    def _supervise(self) -> None:
        assert self.supervisor is not None
        while not self._stop.wait(self.supervisor.poll(0.2)):
            pass
        services = [n for n in self.supervisor.names() if not n.startswith("nats-")]
        self.supervisor.stop(services)
        self.supervisor.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(120)
        self.catalogue.stop()
        if self.ceph:
            self.ceph.stop()

    def _pid(self, name: str) -> list[int]:
        assert self.supervisor is not None
        proc = self.supervisor.process(name)
        return [proc.pid] if proc is not None and proc.poll() is None else []

    def pids(self, kind: str) -> list[int]:
        assert self.supervisor is not None
        if kind == NATS_MEMBER:
            return [p for s in self.cluster.servers for p in self._pid(f"nats-{s.name}")]
        if kind == NATS_LEADER:
            return self._pid(f"nats-{self._stream_leader()}")
        if kind == RECEIVER:
            ingest = self._pid("ingest")
            return [c for pid in ingest for c in children(pid)] or ingest
        names = [n for n in self.supervisor.names() if n == kind or n.startswith(f"{kind}-")]
        return [p for n in names for p in self._pid(n)]

    def _stream_leader(self) -> str:
        async def go() -> str:
            nc = await nats.connect(servers=self.cluster.urls, connect_timeout=2, max_reconnect_attempts=1)
            try:
                from shared.bus.jetstream import api

                info = await api(nc, f"STREAM.INFO.{self.tree['stream'].get('name', 'DICOM')}")
                return info["cluster"]["leader"]
            finally:
                await nc.close()
        return asyncio.run(go())


# --- one run ----------------------------------------------------------------------------------------------


RULES = {"rules": [{"name": "everything-to-archive", "action": "forward", "to": "archive", "when": "instance"}]}


@dataclass
class RunResult:
    """One seed's run: the verdict, the kills made and the recovery time after each, and the sender's log."""

    seed: int
    kinds: tuple[str, ...]
    verdict: Verdict
    kills: list[KillRecord]
    recoveries: list[float | None]
    outcomes: dict[str, int]
    attempts: int
    send_s: float
    settle_s: float
    web_replicas: list[int] = field(default_factory=list)  # the web replicas' pids at the end (web mode)
    forward_queue: dict = field(default_factory=dict)  # the archive queue's consumer counts at the end


def _forward_queue(url: str) -> dict:
    """The archive forward queue's consumer counts (what a forward missing at the end still waits in)."""
    from shared.bus.jetstream import consumer_info
    from shared.contract import subjects

    async def go() -> dict:
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=3)
        try:
            info = await consumer_info(nc, subjects.OUT_STREAM, subjects.forward_durable("archive"))
            return {k: info.get(k) for k in ("num_pending", "num_ack_pending", "num_redelivered")}
        finally:
            await nc.close()
    try:
        return asyncio.run(go())
    except Exception as exc:
        return {"error": str(exc)}


def _events(url: str) -> list[Completion]:
    """Every study-complete and study-updated event in the events stream."""
    async def go() -> list[Completion]:
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=3)
        try:
            js = nc.jetstream()
            sub = await js.subscribe("dicom.study.>", ordered_consumer=True)
            out = []
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.5)
                except nats.errors.TimeoutError:
                    return out
                kind = msg.subject.split(".")[2]
                if kind in ("complete", "updated"):
                    body = json.loads(msg.data)
                    out.append(Completion(body["study_uid"], int(body["instances"]), updated=kind == "updated"))
        finally:
            await nc.close()
    return asyncio.run(go())


class ChaosRun:
    """One run: a stack, a sender, a killer; :meth:`execute` returns the :class:`RunResult`.

    ``group``: the store and router consumer-group settings (the defaults of shared/config.py when empty);
    ``quiet_s``: the router's completion quiet period; ``ceph``: staging and placements in size-2 Ceph pools
    (implied by an OSD kind); ``web_replicas``: DICOMweb processes when web replicas are killed; ``rows``: the
    images' size (default 64, 256 with web kills).
    """

    def __init__(self, work: Path, seed: int, kinds: tuple[str, ...], studies: int = 20, instances: int = 1000,
                 associations: int = 4, window_s: float = 40.0, kills: int = 4, receivers: int = 2,
                 store_workers: int = 2, group: dict | None = None, quiet_s: float = 6.0, settle_s: float = 150.0,
                 rows: int | None = None, stack: str = "embedded", postgres: bool = False, ceph: bool = False,
                 web_replicas: int = 2):
        if stack not in ("embedded", "compose"):
            raise ValueError(f"stack {stack!r}: embedded (dicomflow run) or compose (the services one by one)")
        self.stack_kind, self.postgres = stack, postgres or stack == "compose" or CATALOGUE in kinds
        self.ceph = ceph or OSD in kinds  # staging and placements in size-2 Ceph pools, else the filesystem
        if WEB in kinds and (stack != "embedded" or web_replicas < 2):
            raise ValueError("web kills need `dicomflow run` with web replicas >= 2 (one must stay to serve)")
        self.web_replicas = web_replicas if WEB in kinds else 0
        self.work, self.seed, self.kinds = Path(work), seed, tuple(kinds)
        self.n_studies, self.n_instances, self.associations = studies, instances, associations
        self.window_s, self.kills, self.receivers, self.store_workers = window_s, kills, receivers, store_workers
        self.group = group or {}
        # Images of 64x64 (8 KiB), or 256x256 (128 KiB) where web replicas are killed: a study's answer must be
        # larger than what the kernel's socket buffers hold (about 1.5 MiB on loopback), else a replica killed
        # mid-answer has already handed all of it to the kernel, which delivers it anyway.
        self.quiet_s, self.settle_s = quiet_s, settle_s
        self.rows = rows if rows is not None else 256 if WEB in kinds else 64

    # The data: ~n_instances over n_studies, one file each, with the digest of its data set bytes as sent.
    def _write_studies(self) -> tuple[list[list[Path]], dict[str, SentInstance]]:
        per = [self.n_instances // self.n_studies + (1 if i < self.n_instances % self.n_studies else 0)
               for i in range(self.n_studies)]
        folders, sent = [], {}
        for i, n in enumerate(per):
            study, paths = write_study(self.work / "studies" / f"s{i:02d}", n, rows=self.rows, cols=self.rows,
                                       patient_id=f"CHAOS{self.seed}-{i}")
            folders.append(paths)
            for p in paths:
                sop = p.name[:-len(".dcm")]
                sent[sop] = SentInstance(sop, study, content_digest(dataset_bytes(p)))
        return folders, sent

    def _stack(self) -> tuple[ChaosStack, subprocess.Popen, Path]:
        archive = self.work / "archive"
        archive.mkdir(parents=True, exist_ok=True)
        archive_port = free_port()
        # dcmtk's storescp, bit-preserving (+B): the router's forwards as received.
        scp = subprocess.Popen(["storescp", "-aet", "ARCHIVE", "+B", "-od", str(archive), str(archive_port)],
                               stdout=subprocess.DEVNULL, stderr=open(self.work / "storescp.log", "wb"))
        wait_port("127.0.0.1", archive_port, 10)
        rules = self.work / "rules.yaml"
        rules.write_text(yaml.safe_dump(RULES))
        tree = make_config(
            self.work,
            ingest={"workers": self.receivers},
            store={"workers": self.store_workers, "group": dict(self.group)},
            router={"rules_file": str(rules), "completion": {"quiet_s": self.quiet_s},
                    "group": dict(self.group), "scan_interval_s": 0.5,
                    "targets": {"archive": {"kind": "dicom", "host": "127.0.0.1", "port": archive_port,
                                            "ae_title": "ARCHIVE"}},
                    "forward": {"backoff_initial_s": 0.5, "backoff_max_s": 5}})
        if self.web_replicas:
            tree["web"] = {"port": free_port(), "replicas": self.web_replicas}
        catalogue = ceph = None
        try:
            catalogue = Catalogue(self.work) if self.postgres else None
            ceph = CephPools(self.work) if self.ceph else None
            if self.stack_kind == "compose":
                assert catalogue is not None
                return ComposeStack(self.work, tree, self.store_workers, catalogue, ceph), scp, archive
            return EmbeddedStack(self.work, tree, catalogue, ceph), scp, archive
        except BaseException:
            scp.kill()
            if catalogue is not None:
                catalogue.stop()
            if ceph is not None:
                ceph.stop()
            raise

    def execute(self) -> RunResult:
        self.work.mkdir(parents=True, exist_ok=True)
        folders, sent = self._write_studies()
        study_uids = sorted({s.study for s in sent.values()})
        stack, scp, archive = self._stack()
        schedule = kill_schedule(self.seed, self.kinds, self.window_s, self.kills)
        try:
            stack.start()
            nats_url = stack.nats_url
            watcher = Watcher(stack.tree.get("catalogue", {}).get("url", ""), stack.data_dir, study_uids)
            watcher.start()
            sender = Sender(stack.port, stack.ae_title, folders, self.associations, self.window_s,
                            deadline_s=self.window_s + 120)
            killer = Killer(stack, schedule)
            downloader = None
            if self.web_replicas:
                downloader = Downloader(stack.tree["web"]["port"], "/dicom-web",
                                        lambda: sorted({sent[s].study for s in list(watcher.seen_at) if s in sent}))
                downloader.start()
            sender.start()
            killer.start(sender.t0)
            sender.join()
            send_s = time.time() - sender.t0
            killer.join()
            if downloader is not None:
                time.sleep(3.0)  # the retries of what the last kill cut
                downloader.stop()
            # Settle: every acknowledged instance catalogued and forwarded, every study announced complete.
            t_settle = time.time()
            acked = dict(sender.log.acked_at)
            deadline = t_settle + self.settle_s
            while time.time() < deadline:
                if (all(s in watcher.seen_at for s in acked) and _forwarded_count(archive) >= len(acked)):
                    break
                time.sleep(0.5)
            # The quiet period of the last instance, a scan, and the completion's own publish.
            time.sleep(max(0.0, self.quiet_s + 2.0 - (time.time() - max(acked.values(), default=0))))
            seen = set(watcher.seen_at)
            expected = Counter(s.study for sop, s in sent.items() if sop in seen)
            completions = _wait_events(nats_url, dict(expected), max(30.0, deadline - time.time()))
            settle_s = time.time() - t_settle
            watcher.stop()
            stored = _catalogue_rows(stack, study_uids)
            exported = _export(stack, study_uids, self.work / "export")
            objects = stack.ceph.read_back(stored) if stack.ceph else None
            forwarded = _forwarded(archive)
            forward_queue = _forward_queue(nats_url) if len(forwarded) < len(acked) else {}
            web_replicas = stack.pids(WEB) if self.web_replicas else []
        finally:
            stack.stop()
            scp.terminate()
            scp.wait(10)
        v = verdict(sent, acked, stored, exported, completions, forwarded=forwarded, objects=objects)
        if downloader is not None:
            judge_downloads(v, sent, downloader.downloads, stack.cut_ports)
        recoveries = recovery_times([k.at for k in killer.done if k.pid is not None], acked, watcher.seen_at)
        return RunResult(self.seed, self.kinds, v, killer.done, recoveries, dict(sender.log.outcomes),
                         sender.log.attempts, send_s, settle_s, web_replicas, forward_queue)


def _wait_events(url: str, expected: dict[str, int], timeout: float) -> list[Completion]:
    """The completion events, once every study's last one counts the instances the catalogue holds of it
    (``expected``), or after ``timeout``. A study that completed while a killed router's events waited for their
    redelivery re-opens when they come and completes again (``dicom.study.updated``): that takes a while."""
    end = time.time() + timeout
    while True:
        try:
            events = _events(url)
        except Exception as exc:
            log.warning("reading study events: %s", exc)
            events = []
        last = {e.study: e.instances for e in events}
        if last == expected or time.time() > end:
            return events
        time.sleep(1.0)


def _catalogue_rows(stack: ChaosStack, studies: list[str]) -> list[StoredInstance]:
    """Every catalogue row of the run's studies (counts cross-checked with ``dicomflow studies --json``)."""
    from shared.catalogue.open import open_catalogue

    listed = {s["study_uid"]: s["instances"] for s in stack.studies()}
    catalogue = open_catalogue(stack.tree.get("catalogue", {}).get("url", ""), stack.data_dir)
    try:
        rows = [StoredInstance(r["sop_uid"], r["study_uid"], r["digest"])
                for study in studies for r in catalogue.instances(None, study)]
    finally:
        catalogue.close()
    per_study = Counter(r.study for r in rows)
    for study in studies:
        assert listed.get(study, 0) == per_study[study], (
            f"dicomflow studies lists {listed.get(study, 0)} instances of {study}, its rows are {per_study[study]}")
    return rows


def _export(stack: ChaosStack, studies: list[str], out: Path) -> dict[str, str]:
    """``dicomflow export`` of every study: SOP UID -> digest of the data set bytes read back."""
    digests = {}
    for study in studies:
        folder = out / study
        res = stack.cli("export", "--study", study, "--out", str(folder), "--json", check=False)
        if res.returncode != 0:
            log.warning("export of %s: %s", study, res.stderr.strip())
            continue
        for f in json.loads(res.stdout)["files"]:
            digests[Path(f).name[:-len(".dcm")]] = content_digest(dataset_bytes(Path(f)))
        shutil.rmtree(folder, ignore_errors=True)
    return digests


def _forwarded_count(archive: Path) -> int:
    return sum(1 for p in archive.iterdir() if p.is_file() and not p.name.startswith("."))


def _forwarded(archive: Path) -> set[str]:
    """The SOP UIDs storescp received (a file it was still writing when stopped is skipped)."""
    out = set()
    for p in archive.iterdir():
        try:
            out.add(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID))
        except Exception:
            continue
    return out

