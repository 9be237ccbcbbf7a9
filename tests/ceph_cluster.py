"""A throw-away single-node Ceph cluster for tests and benchmarks: 1 mon + N OSDs in two emulated datacenters.

The daemons run in the foreground as children of this process with PR_SET_PDEATHSIG, so they die with it even
when it is killed; :meth:`CephCluster.stop` kills exactly its own children. No mgr: the data path does not need
one. Ports are free loopback ports, so several clusters (tests of different engineers) coexist on one machine.
Recipe, settings and measured timings: ../shared/notes/ceph.md.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import shutil
import signal
import struct
import subprocess
import time
import uuid
from pathlib import Path

from dicomflow.natsserver import free_port

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def cephx_key() -> str:
    """A fresh cephx secret in the keyring format (what ``ceph-authtool --gen-print-key`` prints)."""
    now = time.time()
    # struct ceph_crypto_key: type (1 = AES), created (sec, nsec), length, secret
    return base64.b64encode(struct.pack("<HIIH", 1, int(now), 0, 16) + os.urandom(16)).decode()


# CRUSH rules by name: (root bucket, failure-domain type). dc-a/dc-b exist once the OSDs placed themselves.
RULES = {"regional-a": ("dc-a", "host"), "regional-b": ("dc-b", "host"), "everywhere": ("default", "datacenter")}


class CephCluster:
    """mon.a + ``osds`` OSDs; the first half in datacenter dc-a, the rest in dc-b (each OSD its own host)."""

    def __init__(self, root: Path, osds: int = 3, bluestore: set[int] | frozenset[int] = frozenset(),
                 osd_gb: int = 2, op_timeout_s: float = 10):
        self.root = Path(root)
        self.osds = osds
        self.bluestore = set(bluestore)
        self.osd_gb = osd_gb
        self.op_timeout_s = op_timeout_s
        self.conf = self.root / "ceph.conf"
        self.keyring = self.root / "keyring"
        self.procs: dict[str, subprocess.Popen] = {}
        self._admin = None

    # ------------------------------------------------------------------ bring-up
    def dc_of(self, osd: int) -> str:
        """The emulated datacenter of an OSD."""
        return "dc-a" if osd < (self.osds + 1) // 2 else "dc-b"

    def _write_conf(self, fsid: str, mon_addr: str) -> None:
        d = self.root
        lines = f"""[global]
fsid = {fsid}
mon host = {mon_addr}
mon initial members = a
public network = 127.0.0.0/8
cluster network = 127.0.0.0/8
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = {self.keyring}
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
crash dir = {d}/crash
mon data = {d}/$name
osd data = {d}/$name
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
rados osd op timeout = {self.op_timeout_s}
rados mon op timeout = {self.op_timeout_s}

[mon]
keyring = {d}/mon.a/keyring
# default 1 s: every osdmap change (pool create, crush rule) would cost about a second
paxos propose interval = 0.05

[osd]
keyring = {d}/$name/keyring
osd objectstore = memstore
memstore device bytes = {self.osd_gb * 1024**3}
# must not be <osd data>/block: BlueStore symlinks that name to the path (ELOOP)
bluestore block path = {d}/$name/block.img
bluestore block create = true
bluestore block size = {self.osd_gb * 1024**3}
bluestore fsck on mount = false
osd memory target = 1073741824
"""
        for i in range(self.osds):
            lines += f"\n[osd.{i}]\ncrush location = root=default datacenter={self.dc_of(i)} host=h{i}\n"
            if i in self.bluestore:
                # survives SIGKILL with its data (memstore keeps data in RAM only)
                lines += "osd objectstore = bluestore\n"
        self.conf.write_text(lines)

    def _popen(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "ab")
        try:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        finally:
            log.close()

    def start(self, timeout: float = 120) -> CephCluster:
        """Create and start the cluster, then the CRUSH rules; returns when every OSD is up."""
        if self.root.exists():
            shutil.rmtree(self.root)
        for sub in ("mon.a", "log", "run", "crash"):
            (self.root / sub).mkdir(parents=True)
        fsid = str(uuid.uuid4())
        mon_addr = f"[v2:127.0.0.1:{free_port()},v1:127.0.0.1:{free_port()}]"
        self._write_conf(fsid, mon_addr)
        self.keyring.write_text(
            f"[mon.]\n\tkey = {cephx_key()}\n\tcaps mon = \"allow *\"\n"
            f"[client.admin]\n\tkey = {cephx_key()}\n\tcaps mon = \"allow *\"\n\tcaps osd = \"allow *\"\n"
            f"\tcaps mgr = \"allow *\"\n\tcaps mds = \"allow *\"\n")
        monmap = self.root / "monmap"
        subprocess.run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", mon_addr, str(monmap)],
                       check=True, capture_output=True)
        subprocess.run(["ceph-mon", "-c", str(self.conf), "-i", "a", "--mkfs", "--monmap", str(monmap),
                        "--keyring", str(self.keyring)], check=True, capture_output=True)
        self.procs["mon.a"] = self._popen("mon.a", ["ceph-mon", "-f", "-c", str(self.conf), "-i", "a"])
        admin = self.admin()
        mkfs = []
        for i in range(self.osds):
            osd_dir = self.root / f"osd.{i}"
            osd_dir.mkdir()
            key, osd_uuid = cephx_key(), str(uuid.uuid4())
            self.mon_command(prefix="osd new", uuid=osd_uuid, id=i, inbuf=json.dumps({"cephx_secret": key}))
            (osd_dir / "keyring").write_text(f"[osd.{i}]\n\tkey = {key}\n")
            mkfs.append(self._popen(f"mkfs.{i}", ["ceph-osd", "-c", str(self.conf), "-i", str(i), "--mkfs",
                                                  "--key", key, "--osd-uuid", osd_uuid]))
        for i, p in enumerate(mkfs):
            if p.wait(timeout) != 0:
                raise RuntimeError(f"ceph-osd mkfs {i} failed: {(self.root / 'log' / f'mkfs.{i}.out').read_text()}")
        for i in range(self.osds):
            self.start_osd(i, wait=False)
        self.wait_up(set(range(self.osds)), timeout)
        for name, (root, ftype) in RULES.items():
            if root == "dc-b" and self.osds < 2:
                continue
            self.mon_command(prefix="osd crush rule create-replicated", name=name, root=root, type=ftype)
        del admin
        return self

    def admin(self):
        """A connected librados handle as client.admin (kept open)."""
        if self._admin is None:
            import rados

            c = rados.Rados(conffile=str(self.conf), rados_id="admin")
            c.connect(timeout=30)
            self._admin = c
        return self._admin

    def mon_command(self, inbuf: str | bytes = b"", **cmd) -> str:
        """Run a mon command (the JSON form the ``ceph`` CLI sends); returns its output, raises on error."""
        ret, out, err = self.admin().mon_command(json.dumps(cmd), inbuf.encode() if isinstance(inbuf, str) else inbuf,
                                                 timeout=30)
        if ret:
            raise RuntimeError(f"ceph {cmd['prefix']}: {ret} {err}")
        return out.decode()

    def create_pool(self, name: str, rule: str = "replicated_rule", size: int = 1, pg_num: int = 8) -> None:
        """A replicated pool under a CRUSH rule, tagged for application 'dicom'."""
        self.mon_command(prefix="osd pool create", pool=name, pg_num=pg_num, pgp_num=pg_num,
                         pool_type="replicated", rule=rule, size=size)
        if size > 1:
            self.mon_command(prefix="osd pool set", pool=name, var="min_size", val="1")
        self.mon_command(prefix="osd pool application enable", pool=name, app="dicom")

    def create_user(self, name: str, osd_caps: str, mon_caps: str = "allow r") -> Path:
        """A cephx client with the given caps; returns the path of its keyring."""
        out = self.mon_command(prefix="auth get-or-create", entity=f"client.{name}",
                               caps=["mon", mon_caps, "osd", osd_caps])
        path = self.root / f"client.{name}.keyring"
        path.write_text(out)
        return path

    # ------------------------------------------------------------------ OSD faults
    def start_osd(self, i: int, wait: bool = True, timeout: float = 60) -> None:
        """(Re)start osd.i in the foreground; with ``wait``, return once the mon has it up."""
        self.procs[f"osd.{i}"] = self._popen(f"osd.{i}", ["ceph-osd", "-f", "-c", str(self.conf), "-i", str(i)])
        if wait:
            self.wait_up({i}, timeout)

    def kill_osd(self, i: int, tell_mon: bool = True) -> int:
        """SIGKILL osd.i; its pid. With ``tell_mon``, mark it down at once (without that, peers report it only
        after the heartbeat grace, or at once when its ports refuse them: the chaos suite's realistic crash)."""
        proc = self.procs.pop(f"osd.{i}")
        proc.kill()
        proc.wait()
        if tell_mon:
            self.mon_command(prefix="osd down", ids=[str(i)])
        return proc.pid

    def osd_pids(self) -> dict[int, int]:
        """The live OSD daemons: id -> pid."""
        return {int(name[4:]): p.pid for name, p in self.procs.items()
                if name.startswith("osd.") and p.poll() is None}

    def up_osds(self) -> set[int]:
        """The OSD ids the mon's osdmap has up."""
        dump = json.loads(self.mon_command(prefix="osd dump", format="json"))
        return {o["osd"] for o in dump["osds"] if o["up"]}

    def wait_up(self, ids: set[int], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ids <= self.up_osds():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited {p.returncode}: see {self.root / 'log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"OSDs {sorted(ids - self.up_osds())} not up after {timeout}s")
            time.sleep(0.1)

    def osd_map(self, pool: str, obj: str, namespace: str = "") -> dict:
        """``ceph osd map POOL OBJ [NSPACE]`` through the real CLI: the object's up and acting OSD sets."""
        argv = ["ceph", "-c", str(self.conf), "--connect-timeout", "30", "osd", "map", pool, obj]
        if namespace:
            argv.append(namespace)
        res = subprocess.run([*argv, "-f", "json"], capture_output=True, text=True, timeout=60, check=True)
        return json.loads(res.stdout)

    # ------------------------------------------------------------------ teardown
    def stop(self, wipe: bool = True) -> None:
        """SIGKILL our own daemons (OSDs first), reap them, and remove the data directory."""
        if self._admin is not None:
            try:
                self._admin.shutdown()
            except Exception:
                pass
            self._admin = None
        for name in sorted(self.procs, key=lambda n: n.startswith("mon")):
            p = self.procs[name]
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs.clear()
        if wipe:
            shutil.rmtree(self.root, ignore_errors=True)
