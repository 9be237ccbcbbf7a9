"""``dicomflow run``: the embedded default - nats-server from the venv plus every service, on one machine.

A supervisor, not a framework: it starts the NATS server, then each service as its own process
(the same commands a container runs), restarts a process that dies, and on Ctrl-C stops the
services first (they drain and ack) and NATS last. Data lives under data_dir, so a restart keeps it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dicomflow.natsserver import NatsServer, wait_port
from shared.config import Config

log = logging.getLogger("dicomflow.run")

# Scheduling niceness of every service but the ingest (see run()).
BACKGROUND_NICE = 10

# Offsets from telemetry.metrics_port for each service's /metrics, so they never collide.
METRICS_OFFSETS = {"ingest": 0, "store": 20, "router": 40, "autoscaler": 60}


@dataclass
class Child:
    """One supervised service process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started: float = field(default=0.0)
    nice: int = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env,
                                     preexec_fn=(lambda: os.nice(self.nice)) if self.nice else None)
        self.started = time.monotonic()


def _env(config: Config, nats_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DICOMFLOW__NATS__URL"] = nats_url
    env["DICOMFLOW_DATA_DIR"] = str(Path(config.data_dir).resolve())
    # The children read the file and the environment only: the command line's SCP options (run --dicom-port,
    # --ae-title, --host) reach them as the environment overrides of the effective values.
    env["DICOMFLOW__INGEST__PORT"] = str(config.ingest.port)
    env["DICOMFLOW__INGEST__AE_TITLE"] = config.ingest.ae_title
    env["DICOMFLOW__INGEST__HOST"] = config.ingest.host
    return env


def run(config: Config, config_path: str | None, stop: threading.Event | None = None) -> int:
    """Start everything, supervise until SIGINT/SIGTERM, stop everything. Returns the exit code."""
    data = Path(config.data_dir).resolve()
    (data / "run").mkdir(parents=True, exist_ok=True)
    nats_url = config.nats_servers()[0]
    server = None
    if not config.nats.url:
        server = NatsServer(data / "nats", config.nats.port, config.nats.monitor_port,
                            log_file=data / "run" / "nats-server.log").start()
        log.info("nats-server with JetStream on %s (data %s)", server.url, data / "nats")
    base = [sys.executable, "-m", "dicomflow"]
    if config_path:
        base += ["--config", str(config_path)]
    env = _env(config, nats_url)
    mport = config.telemetry.metrics_port
    children = [Child("ingest", [*base, "ingest", *(["--metrics-port", str(mport)] if mport else [])], env)]
    if _autoscaled(config):
        # The autoscaler owns the store workers: it starts min_replicas of them and scales them from the lag.
        children.append(Child("autoscaler", [*base, "autoscaler",
                                             "--metrics-port", str(mport + METRICS_OFFSETS["autoscaler"] if mport else 0),
                                             "--worker-metrics-base", str(mport + METRICS_OFFSETS["store"] if mport else 0)],
                              {**env, "DICOMFLOW__AUTOSCALER__ACTUATOR": "local"}))
    else:
        for i in range(config.store.workers):
            port = mport + METRICS_OFFSETS["store"] + i if mport else 0
            children.append(Child(f"store-{i}", [*base, "store", "--metrics-port", str(port)], env))
    if config.router.rules_file:  # without rules there is nothing to route
        port = mport + METRICS_OFFSETS["router"] if mport else 0
        children.append(Child("router", [*base, "router", "--metrics-port", str(port)], env))
    _write_targets(data, config, mport)
    for c in children:
        if c.name != "ingest":
            # The modality waits for the ingest's answer; the rest works from the stream's backlog. On a
            # saturated machine the consumers yield the CPU to the receivers (children inherit it).
            c.nice = BACKGROUND_NICE
        c.start()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    try:
        wait_port(config.ingest.host if config.ingest.host != "0.0.0.0" else "127.0.0.1", config.ingest.port, 60)
        log.info("ready: send studies with  storescu -aec %s %s %d +sd DIR", config.ingest.ae_title,
                 config.ingest.host, config.ingest.port)
        (data / "run" / "ready").write_text(json.dumps({"nats": nats_url, "dicom_port": config.ingest.port,
                                                        "pid": os.getpid()}))
    except TimeoutError:
        log.error("the DICOM port %d did not open", config.ingest.port)
        stop.set()
    while not stop.wait(0.5):
        for c in children:
            if c.proc and c.proc.poll() is not None:
                c.restarts += 1
                log.error("%s exited with %s; restarting (restart %d)", c.name, c.proc.returncode, c.restarts)
                time.sleep(min(5, 0.5 * c.restarts))
                c.start()
    log.info("stopping services")
    (data / "run" / "ready").unlink(missing_ok=True)
    for c in children:
        if c.proc and c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    for c in children:
        if c.proc:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing", c.name)
                c.proc.kill()
    if server:
        server.stop()
    log.info("stopped")
    return 0


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
    (data / "run" / "prometheus-targets.json").write_text(json.dumps(targets, indent=2))
