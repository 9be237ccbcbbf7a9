"""The local actuator: worker processes of a consumer group on this machine, kept at a replica count.

Like a ReplicaSet: ``scale_to(group, n)`` sets the spec and starts or stops ``dicomflow <group>``
processes; :meth:`LocalWorkers.reconcile` restarts one that died (with a backoff per worker, see
shared.supervisor). Scale-down stops the newest workers with SIGTERM and waits for their graceful
drain (stop pulling, finish and ack in-flight events, unpin, leave the group): only then is the
next decision taken, so the group is never asked to rebalance while workers are still leaving. A
worker that outlives ``drain_timeout_s`` is killed; JetStream redelivers what it held (handlers
are idempotent).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shared.supervisor import ChildSpec, RestartPolicy, Supervisor

log = logging.getLogger("dicomflow.autoscaler")


def dicomflow_command(config_path: str | None, metrics_base: int = 0) -> Callable[[str, int], list[str]]:
    """argv of worker ``slot`` of ``group``: ``python -m dicomflow [--config F] <group> --metrics-port P``."""
    def argv(group: str, slot: int) -> list[str]:
        cmd = [sys.executable, "-m", "dicomflow"]
        if config_path:
            cmd += ["--config", str(config_path)]
        return [*cmd, group, "--metrics-port", str(metrics_base + slot if metrics_base else 0)]
    return argv


class LocalWorkers:
    """Start, stop and supervise worker processes per consumer group (children of one :class:`Supervisor`).

    Workers are started from the threads that call :meth:`scale_to` and :meth:`reconcile` (the autoscaler's
    executor threads, alive as long as its loop), so each worker ends with the autoscaler (see shared.supervisor).
    """

    def __init__(self, command: Callable[[str, int], list[str]], env: dict[str, str] | None = None,
                 log_dir: Path | None = None, drain_timeout_s: Callable[[str], float] | float = 120.0,
                 policy: RestartPolicy | None = None):
        self.command = command
        self.env = env
        self.log_dir = log_dir
        self._drain = drain_timeout_s if callable(drain_timeout_s) else (lambda _g, t=drain_timeout_s: t)
        self._supervisor = Supervisor(policy, log)
        # group -> slot -> when it was added (the newest leave first). Slots are reused, so metrics ports and
        # log files stay stable.
        self._slots: dict[str, dict[int, float]] = {}
        self._spec: dict[str, int] = {}
        self._lock = threading.RLock()
        self._stopping = False

    @property
    def restarts(self) -> int:
        """Workers restarted after exiting on their own, since the start."""
        return self._supervisor.restarts

    def current(self, group: str) -> int:
        """The replica count asked for (the spec, like ``scale.spec.replicas``)."""
        with self._lock:
            return self._spec.get(group, 0)

    def running(self, group: str) -> list[int]:
        """PIDs of the live workers of ``group``."""
        with self._lock:
            procs = [self._supervisor.process(_name(group, s)) for s in self._slots.get(group, {})]
            return [p.pid for p in procs if p is not None and p.poll() is None]

    def _spec_of(self, group: str, slot: int) -> ChildSpec:
        logs = {}
        if self.log_dir:
            # stdout apart from the log: a console trace exporter writes its spans there.
            logs = {"log_file": self.log_dir / f"{group}-{slot}.log",
                    "stdout_file": self.log_dir / f"{group}-{slot}.stdout"}
        return ChildSpec(_name(group, slot), self.command(group, slot), self.env,
                         stop_timeout_s=self._drain(group), **logs)

    def scale_to(self, group: str, replicas: int) -> None:
        """Run exactly ``replicas`` workers of ``group``: start new ones, drain and stop the newest extra ones."""
        with self._lock:
            self._spec[group] = replicas
            slots = self._slots.setdefault(group, {})
            slot = 0
            while len(slots) < replicas:
                while slot in slots:
                    slot += 1
                proc = self._supervisor.start(self._spec_of(group, slot))
                slots[slot] = time.monotonic()
                log.info("%s: started worker %d (pid %d)", group, slot, proc.pid)
            extra = sorted(slots, key=lambda s: (slots[s], s))[replicas:] if replicas < len(slots) else []
            for s in extra:
                del slots[s]
            leaving = self._supervisor.terminate([_name(group, s) for s in extra])
        # Outside the lock: a drain takes up to drain_timeout_s, and reconcile must not wait for it.
        self._supervisor.await_stopped(leaving)

    def reconcile(self) -> int:
        """Restart workers that died on their own, each with its own backoff; returns how many were restarted."""
        with self._lock:
            if self._stopping:
                return 0
            before = self._supervisor.restarts
            self._supervisor.poll()
            return self._supervisor.restarts - before

    def close(self) -> None:
        """Drain and stop every worker (SIGTERM, wait)."""
        with self._lock:
            self._stopping = True
            self._slots.clear()
            leaving = self._supervisor.terminate()
        self._supervisor.await_stopped(leaving)


def _name(group: str, slot: int) -> str:
    return f"{group}-{slot}"
