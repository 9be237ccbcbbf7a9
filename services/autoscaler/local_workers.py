"""The local actuator: worker processes of a consumer group on this machine, kept at a replica count.

Like a ReplicaSet: ``scale_to(group, n)`` sets the spec and starts or stops ``dicomflow <group>``
processes; :meth:`LocalWorkers.reconcile` restarts one that died. Scale-down stops the newest workers
with SIGTERM and waits for their graceful drain (stop pulling, finish and ack in-flight events,
unpin, leave the group): only then is the next decision taken, so the group is never asked to
rebalance while workers are still leaving. A worker that outlives ``drain_timeout_s`` is killed;
JetStream redelivers what it held (handlers are idempotent).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("dicomflow.autoscaler")


@dataclass
class Worker:
    """One worker process in a slot (slots are reused, so metrics ports and log files stay stable)."""

    slot: int
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)


def dicomflow_command(config_path: str | None, metrics_base: int = 0) -> Callable[[str, int], list[str]]:
    """argv of worker ``slot`` of ``group``: ``python -m dicomflow [--config F] <group> --metrics-port P``."""
    def argv(group: str, slot: int) -> list[str]:
        cmd = [sys.executable, "-m", "dicomflow"]
        if config_path:
            cmd += ["--config", str(config_path)]
        return [*cmd, group, "--metrics-port", str(metrics_base + slot if metrics_base else 0)]
    return argv


class LocalWorkers:
    """Start, stop and supervise worker processes per consumer group."""

    def __init__(self, command: Callable[[str, int], list[str]], env: dict[str, str] | None = None,
                 log_dir: Path | None = None, drain_timeout_s: Callable[[str], float] | float = 120.0):
        self.command = command
        self.env = env
        self.log_dir = log_dir
        self._drain = drain_timeout_s if callable(drain_timeout_s) else (lambda _g, t=drain_timeout_s: t)
        self._workers: dict[str, dict[int, Worker]] = {}
        self._spec: dict[str, int] = {}
        self._lock = threading.RLock()
        self._stopping = False
        self.restarts = 0

    def current(self, group: str) -> int:
        """The replica count asked for (the spec, like ``scale.spec.replicas``)."""
        with self._lock:
            return self._spec.get(group, 0)

    def running(self, group: str) -> list[int]:
        """PIDs of the live workers of ``group``."""
        with self._lock:
            return [w.proc.pid for w in self._workers.get(group, {}).values() if w.proc.poll() is None]

    def _start(self, group: str, slot: int) -> None:
        out = err = None
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            # stdout apart from the log: a console trace exporter writes its spans there.
            out = open(self.log_dir / f"{group}-{slot}.stdout", "ab")
            err = open(self.log_dir / f"{group}-{slot}.log", "ab")
        proc = subprocess.Popen(self.command(group, slot), env=self.env, stdout=out, stderr=err)
        for f in (out, err):
            if f:
                f.close()
        self._workers.setdefault(group, {})[slot] = Worker(slot, proc)
        log.info("%s: started worker %d (pid %d)", group, slot, proc.pid)

    def scale_to(self, group: str, replicas: int) -> None:
        """Run exactly ``replicas`` workers of ``group``: start new ones, drain and stop the newest extra ones."""
        with self._lock:
            self._spec[group] = replicas
            workers = self._workers.setdefault(group, {})
            slot = 0
            while len(workers) < replicas:
                while slot in workers:
                    slot += 1
                self._start(group, slot)
            extra = sorted(workers.values(), key=lambda w: (w.started, w.slot))[replicas:] if replicas < len(workers) else []
            for w in extra:
                del workers[w.slot]
        self._drain_all(group, extra)

    def _drain_all(self, group: str, workers: list[Worker]) -> None:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._drain(group)
        for w in workers:
            t0 = time.monotonic()
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
                log.info("%s: worker %d (pid %d) drained and left in %.1f s (exit %s)", group, w.slot, w.proc.pid,
                         time.monotonic() - t0, w.proc.returncode)
            except subprocess.TimeoutExpired:
                log.warning("%s: worker %d (pid %d) did not drain in time; killed", group, w.slot, w.proc.pid)
                w.proc.kill()
                w.proc.wait()

    def reconcile(self) -> int:
        """Restart workers that died on their own; returns how many were restarted."""
        restarted = 0
        with self._lock:
            if self._stopping:
                return 0
            for group, workers in self._workers.items():
                for slot, w in list(workers.items()):
                    if w.proc.poll() is not None:
                        log.error("%s: worker %d (pid %d) exited with %s; restarting", group, slot, w.proc.pid,
                                  w.proc.returncode)
                        self._start(group, slot)
                        restarted += 1
        self.restarts += restarted
        return restarted

    def close(self) -> None:
        """Drain and stop every worker (SIGTERM, wait)."""
        with self._lock:
            self._stopping = True
            groups = {g: list(ws.values()) for g, ws in self._workers.items()}
            self._workers.clear()
        for group, workers in groups.items():
            self._drain_all(group, workers)
