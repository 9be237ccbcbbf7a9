"""``dicomflow run``: the embedded default - nats-server from the venv plus every service, on one machine.

A supervisor, not a framework (shared.supervisor): it starts the NATS server, then each service as its
own process (the same commands a container runs), restarts any of them that dies (nats-server too, on
the same ports and data), and on Ctrl-C stops the services first (they drain and ack) and NATS last.
Its children end with it, even when it is killed. Data lives under data_dir, so a restart keeps it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

from dicomflow.natsserver import NatsServer, accepts, port_taken
from shared.bus.connection import check_credentials
from shared.config import Config
from shared.supervisor import ChildSpec, Supervisor, listening_socket

log = logging.getLogger("dicomflow.run")

# Scheduling niceness of every service but the ingest (see _service_specs()).
BACKGROUND_NICE = 10

# Offsets from telemetry.metrics_port for each service's /metrics, so they never collide.
METRICS_OFFSETS = {"ingest": 0, "store": 20, "router": 40, "autoscaler": 60, "web": 80, "releaser": 100}


def _env(config: Config, nats_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DICOMFLOW__NATS__URL"] = nats_url
    env["DICOMFLOW_DATA_DIR"] = str(Path(config.data_dir).resolve())
    # The children read the file and the environment only: the command line's SCP options (run --dicom-port,
    # --ae-title, --host) reach them as the environment overrides of the effective values.
    env["DICOMFLOW__INGEST__PORT"] = str(config.ingest.port)
    env["DICOMFLOW__INGEST__AE_TITLE"] = config.ingest.ae_title
    env["DICOMFLOW__INGEST__HOST"] = config.ingest.host
    env["DICOMFLOW__WEB__PORT"] = str(config.web.port)
    return env


def run(config: Config, config_path: str | None, stop: threading.Event | None = None) -> int:
    """Start everything, supervise until SIGINT/SIGTERM, stop everything. Returns the exit code."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        # Before anything starts: a Ctrl-C at any moment (the wait for the ports too) is a graceful stop.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    data = Path(config.data_dir).resolve()
    (data / "run").mkdir(parents=True, exist_ok=True)
    taken = _taken_ports(config)
    if taken:
        for line in taken:
            log.error("%s", line)
        return 1
    # Left by a run that was killed: nobody must take it for this one's.
    (data / "run" / "ready").unlink(missing_ok=True)
    nats_url = config.nats_servers()[0]
    if config.nats.url:
        # An external NATS that refuses the credentials: said once here (the command exits 78 naming the
        # setting), not by every service restarted forever.
        check_credentials(config)
    # Children are started from this (the calling) thread: they end with it (PR_SET_PDEATHSIG).
    supervisor = Supervisor(logger=log)
    services: list[str] = []
    # The DICOMweb port is this process's: every web replica inherits it (shared.web.server), so one that
    # dies or restarts refuses no connection.
    web_socket = listening_socket(config.web.host, config.web.port) if config.web.port else None
    try:
        if not config.nats.url:
            server = NatsServer(data / "nats", config.nats.port, config.nats.monitor_port)
            # Its own session: a Ctrl-C in the terminal must not stop it before the services have drained.
            # Restarted with the same config file: the same ports and JetStream directory.
            supervisor.start(ChildSpec("nats-server", server.argv(), log_file=data / "run" / "nats-server.log",
                                       stop_timeout_s=10, new_session=True))
            if not _wait_accepting(supervisor, server.host, server.port, 15, stop):
                return _stopped_or_failed(stop, f"nats-server did not open {server.url} in 15 s "
                                                f"(see {data / 'run' / 'nats-server.log'})")
            log.info("nats-server with JetStream on %s (data %s)", server.url, data / "nats")
        for spec in _service_specs(config, config_path, nats_url,
                                   web_socket.fileno() if web_socket is not None else None):
            supervisor.start(spec)
            services.append(spec.name)
        _write_targets(data, config, config.telemetry.metrics_port)
        host = config.ingest.host if config.ingest.host != "0.0.0.0" else "127.0.0.1"
        if not _wait_accepting(supervisor, host, config.ingest.port, 60, stop):
            return _stopped_or_failed(stop, f"the DICOM port {config.ingest.port} did not open in 60 s")
        if config.web.port:
            web_host = config.web.host if config.web.host != "0.0.0.0" else "127.0.0.1"
            # The socket accepts from the start (into its backlog): wait for a replica's first answer.
            if not _wait_answering(supervisor, web_host, config.web.port, 60, stop, tls=bool(config.web.tls_cert)):
                return _stopped_or_failed(stop, f"the DICOMweb port {config.web.port} did not answer in 60 s")
            log.info("DICOMweb (QIDO-RS, metadata, WADO-RS) on %s://%s:%d%s, %d process(es)",
                     "https" if config.web.tls_cert else "http", web_host,
                     config.web.port, config.web.path_prefix, config.web.replicas)
        log.info("ready: send studies with  storescu -aec %s %s %d +sd DIR", config.ingest.ae_title,
                 config.ingest.host, config.ingest.port)
        (data / "run" / "ready").write_text(json.dumps({"nats": nats_url, "dicom_port": config.ingest.port,
                                                        "pid": os.getpid()}))
        while not stop.wait(supervisor.poll()):
            pass
        return 0
    finally:
        log.info("stopping services")
        (data / "run" / "ready").unlink(missing_ok=True)
        supervisor.stop(services)  # they drain and ack while NATS is still there
        supervisor.stop()
        if web_socket is not None:
            web_socket.close()
        log.info("stopped")


def _wait_accepting(supervisor: Supervisor, host: str, port: int, timeout: float, stop: threading.Event) -> bool:
    """Supervise until host:port accepts connections; False after ``timeout`` or once ``stop`` is set."""
    deadline = time.monotonic() + timeout
    while not accepts(host, port):
        if time.monotonic() > deadline or stop.wait(min(0.2, supervisor.poll())):
            return False
    return True


def _answers_http(host: str, port: int, tls: bool = False) -> bool:
    """Whether an HTTP request to host:port gets a status line (any status: 401 too) within 2 s; over TLS
    (certificate not checked: this asks whether our own replica answers, not who it is) when ``tls``."""
    try:
        with socket.create_connection((host, port), timeout=2) as raw:
            conn = raw
            if tls:
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                conn = ctx.wrap_socket(raw, server_hostname=host)
            conn.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode())
            return conn.recv(5) == b"HTTP/"
    except OSError:
        return False


def _wait_answering(supervisor: Supervisor, host: str, port: int, timeout: float, stop: threading.Event,
                    tls: bool = False) -> bool:
    """Supervise until an HTTP server answers on host:port; False after ``timeout`` or once ``stop`` is set."""
    deadline = time.monotonic() + timeout
    while not _answers_http(host, port, tls):
        if time.monotonic() > deadline or stop.wait(min(0.2, supervisor.poll())):
            return False
    return True


def _stopped_or_failed(stop: threading.Event, failure: str) -> int:
    """The exit code of a wait that ended early: 0 when asked to stop, else 1 (and why, in the log)."""
    if stop.is_set():
        return 0
    log.error("%s", failure)
    return 1


def _taken_ports(config: Config) -> list[str]:
    """Why this run cannot start: each port it would listen on that something else holds (another run?)."""
    ports = [("ingest.port", config.ingest.host, config.ingest.port, "--dicom-port or DICOMFLOW__INGEST__PORT")]
    if config.web.port:
        ports.append(("web.port", config.web.host, config.web.port, "--web-port or DICOMFLOW__WEB__PORT, 0 turns it off"))
    if not config.nats.url:
        ports.append(("nats.port", "127.0.0.1", config.nats.port, "DICOMFLOW__NATS__PORT"))
        if config.nats.monitor_port:
            ports.append(("nats.monitor_port", "127.0.0.1", config.nats.monitor_port,
                          "DICOMFLOW__NATS__MONITOR_PORT, 0 turns it off"))
    return [f"port {port} ({setting}) is in use on {host}, by another dicomflow run with another data directory? "
            f"Set {setting} to a free port ({how})"
            for setting, host, port, how in ports if port_taken(host, port)]


def _service_specs(config: Config, config_path: str | None, nats_url: str,
                   web_fd: int | None = None) -> list[ChildSpec]:
    """The service processes of this run: the same commands a container runs.

    ``web_fd``: the DICOMweb listening socket the ``web.replicas`` web processes inherit (else each binds).
    """
    base = [sys.executable, "-m", "dicomflow"]
    if config_path:
        base += ["--config", str(config_path)]
    env = _env(config, nats_url)
    mport = config.telemetry.metrics_port
    # The modality waits for the ingest's answer; the rest works from the stream's backlog. On a
    # saturated machine the consumers yield the CPU to the receivers (children inherit it).
    background = {"env": env, "nice": BACKGROUND_NICE, "stop_timeout_s": 60}
    specs = [ChildSpec("ingest", [*base, "ingest", *(["--metrics-port", str(mport)] if mport else [])], env,
                       stop_timeout_s=config.ingest.stop_drain_s() + 10)]
    if _autoscaled(config):
        # The autoscaler owns the store workers: it starts min_replicas of them and scales them from the lag.
        specs.append(ChildSpec("autoscaler", [
            *base, "autoscaler", "--metrics-port", str(mport + METRICS_OFFSETS["autoscaler"] if mport else 0),
            "--worker-metrics-base", str(mport + METRICS_OFFSETS["store"] if mport else 0)],
            **{**background, "env": {**env, "DICOMFLOW__AUTOSCALER__ACTUATOR": "local"}}))
    else:
        for i in range(config.store.workers):
            port = mport + METRICS_OFFSETS["store"] + i if mport else 0
            specs.append(ChildSpec(f"store-{i}", [*base, "store", "--metrics-port", str(port)], **background))
    if config.router.rules_file:  # without rules there is nothing to route
        port = mport + METRICS_OFFSETS["router"] if mport else 0
        specs.append(ChildSpec("router", [*base, "router", "--metrics-port", str(port)], **background))
    if releasing(config):
        port = mport + METRICS_OFFSETS["releaser"] if mport else 0
        specs.append(ChildSpec("releaser", [*base, "releaser", "--metrics-port", str(port)], **background))
    if config.web.port:
        # SIGTERM: they drain for web.drain_s before they exit; the supervisor waits a little longer.
        web_stop = {**background, "stop_timeout_s": config.web.drain_s + 10}
        inherit = ["--listen-fd", str(web_fd)] if web_fd is not None else []
        for i in range(config.web.replicas):
            port = mport + METRICS_OFFSETS["web"] + i if mport else 0
            name = "web" if config.web.replicas == 1 else f"web-{i}"
            specs.append(ChildSpec(name, [*base, "web", "--metrics-port", str(port), *inherit],
                                   pass_fds=(web_fd,) if web_fd is not None else (), **web_stop))
    return specs


def releasing(config: Config) -> bool:
    """Whether a staging releaser has anything to do: enabled, and staging is not itself a placement."""
    from services.releaser.decision import staging_is_placement

    policies = {n: p.placements for n, p in config.storage.policies.items()}
    return config.release.enabled and staging_is_placement(config.storage.staging, policies) is None


def _autoscaled(config: Config) -> bool:
    group = config.autoscaler.groups.get("store")
    return config.autoscaler.enabled and group is not None and group.enabled


def _write_targets(data: Path, config: Config, mport: int) -> None:
    """A Prometheus file_sd document listing every /metrics endpoint of this run."""
    if not mport:
        return
    host = config.telemetry.metrics_host
    store_workers = config.autoscaler.groups["store"].max_replicas if _autoscaled(config) else config.store.workers
    targets = [{"targets": [f"{host}:{mport + i}" for i in range(config.ingest.workers)], "labels": {"service": "ingest"}},
               {"targets": [f"{host}:{mport + METRICS_OFFSETS['store'] + i}" for i in range(store_workers)],
                "labels": {"service": "store"}}]
    if _autoscaled(config):
        targets.append({"targets": [f"{host}:{mport + METRICS_OFFSETS['autoscaler']}"], "labels": {"service": "autoscaler"}})
    if config.router.rules_file:
        targets.append({"targets": [f"{host}:{mport + METRICS_OFFSETS['router']}"], "labels": {"service": "router"}})
    if releasing(config):
        targets.append({"targets": [f"{host}:{mport + METRICS_OFFSETS['releaser']}"], "labels": {"service": "releaser"}})
    if config.web.port:
        targets.append({"targets": [f"{host}:{mport + METRICS_OFFSETS['web'] + i}" for i in range(config.web.replicas)],
                        "labels": {"service": "web"}})
    (data / "run" / "prometheus-targets.json").write_text(json.dumps(targets, indent=2))
