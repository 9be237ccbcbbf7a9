"""The one process supervisor: child processes started from specs, restarted with backoff, stopped gracefully.

Used by ``dicomflow run`` (nats-server and every service, the DICOMweb replicas sharing one listening socket
made by :func:`listening_socket`), by the ingest (its receiver processes sharing
one listening socket) and by the autoscaler's local actuator (worker processes per consumer group).

Two halves, as everywhere in dicomflow:

- the restart policy (:class:`RestartPolicy`, :class:`RestartState`, :func:`after_exit`) is pure: when a
  child that exited is started again, with a backoff of its own that is forgotten after a healthy run.
  Like the kubelet's CrashLoopBackOff: the first exit after a healthy run restarts at once, repeated
  exits wait ``backoff_delay`` (0.5 s, 1 s, 2 s ... capped), and a child that then ran ``healthy_after_s``
  starts from zero again.
- :class:`Supervisor` is the shell: it forks, polls, signals. Its :meth:`Supervisor.poll` never sleeps; it
  says how long the caller may wait until the next restart is due, so one child's backoff never holds the
  restart of another.

Every child ends with its supervisor: it is started with ``PR_SET_PDEATHSIG`` = SIGTERM, so a supervisor
killed with SIGKILL (or by the OOM killer) does not leave a nats-server holding the port and the JetStream
directory, or workers holding partitions. The kernel sends that signal when the *thread* that forked the
child ends, so start children from the main thread or from a thread that lives as long as the supervisor.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from shared.backoff import backoff_delay

log = logging.getLogger("dicomflow.supervisor")

_PR_SET_PDEATHSIG = 1
# Loaded before any fork: the child between fork and exec may only call what is already there.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


# --- the pure part: when to restart ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RestartPolicy:
    """How a child that exited on its own is started again."""

    initial_s: float = 0.5  # backoff of the second exit in a row (the first restarts at once)
    max_s: float = 10.0
    # A child that ran this long has its count of exits forgotten. Short: a service that crashes on its own
    # does so while starting (config, NATS unreachable: within the 5 s connect timeout), while one killed
    # from outside (OOM, kill -9) after it was up must come back at once however often that happens.
    healthy_after_s: float = 5.0


@dataclass(frozen=True)
class RestartState:
    """What the policy knows of one child: its exits in a row, when it started, when it is due again."""

    failures: int = 0
    started_at: float = 0.0
    restart_at: float | None = None  # None while it runs


def after_start(state: RestartState, now: float) -> RestartState:
    """The state of a child just (re)started at ``now``."""
    return replace(state, started_at=now, restart_at=None)


def after_exit(state: RestartState, policy: RestartPolicy, now: float) -> RestartState:
    """The state of a child found exited at ``now``: its exits in a row and when it is due again."""
    healthy = now - state.started_at >= policy.healthy_after_s
    failures = 1 if healthy else state.failures + 1
    delay = 0.0 if failures == 1 else backoff_delay(failures - 1, policy.initial_s, policy.max_s)
    return replace(state, failures=failures, restart_at=now + delay)


def is_due(state: RestartState, now: float) -> bool:
    """Whether a child that exited is to be started again at ``now``."""
    return state.restart_at is not None and now >= state.restart_at


def listening_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening socket made once by a supervisor, for its children to inherit (``ChildSpec.pass_fds``).

    Every child accepts from it: a new connection goes to one that is waiting in accept, and while a child
    restarts (or drains) connections wait in the backlog or go to the others instead of being refused.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


# --- the shell: processes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildSpec:
    """How to start one child. ``log_file`` takes stderr (and stdout unless ``stdout_file`` is given)."""

    name: str
    argv: Sequence[str]
    env: dict[str, str] | None = None
    nice: int = 0
    pass_fds: tuple[int, ...] = ()
    log_file: Path | None = None
    stdout_file: Path | None = None
    stop_timeout_s: float = 30.0  # SIGTERM, then this long to drain, then SIGKILL
    new_session: bool = False  # out of the terminal's process group: Ctrl-C reaches it only through us


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen
    state: RestartState = field(default_factory=RestartState)


def _child_setup(nice: int, parent: int) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:  # the supervisor died before prctl: nobody would signal us
                os.kill(os.getpid(), signal.SIGTERM)
        if nice:
            os.nice(nice)
    return setup


def spawn(spec: ChildSpec) -> subprocess.Popen:
    """Start the process of ``spec`` (bound to end with this process)."""
    files = []
    try:
        err = out = None
        if spec.log_file:
            spec.log_file.parent.mkdir(parents=True, exist_ok=True)
            err = open(spec.log_file, "ab")
            files.append(err)
            out = err
        if spec.stdout_file:
            spec.stdout_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(spec.stdout_file, "ab")
            files.append(out)
        return subprocess.Popen(list(spec.argv), env=spec.env, stdout=out,
                                stderr=subprocess.STDOUT if err is not None and out is err else err,
                                pass_fds=spec.pass_fds, start_new_session=spec.new_session,
                                preexec_fn=_child_setup(spec.nice, os.getpid()))
    finally:
        for f in files:
            f.close()  # the child holds its own copies


@dataclass(frozen=True)
class Stopping:
    """A child sent SIGTERM, to be awaited (:meth:`Supervisor.await_stopped`)."""

    spec: ChildSpec
    proc: subprocess.Popen


class Supervisor:
    """A set of named children, each restarted by the policy when it exits on its own."""

    def __init__(self, policy: RestartPolicy | None = None, logger: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.policy = policy or RestartPolicy()
        self.log = logger or log
        self.clock = clock
        self.restarts = 0
        self._children: dict[str, _Child] = {}
        self._lock = threading.RLock()

    def start(self, spec: ChildSpec) -> subprocess.Popen:
        """Start ``spec`` and supervise it from now on."""
        with self._lock:
            if spec.name in self._children:
                raise ValueError(f"child {spec.name} is already supervised")
            proc = spawn(spec)
            self._children[spec.name] = _Child(spec, proc, after_start(RestartState(), self.clock()))
            return proc

    def names(self) -> list[str]:
        """The supervised children, in the order they were started."""
        with self._lock:
            return list(self._children)

    def process(self, name: str) -> subprocess.Popen | None:
        """The current process of child ``name`` (None when not supervised)."""
        with self._lock:
            child = self._children.get(name)
            return child.proc if child else None

    def alive(self, name: str) -> bool:
        proc = self.process(name)
        return proc is not None and proc.poll() is None

    def poll(self, max_wait: float = 0.5) -> float:
        """Note children that exited and restart those that are due; never sleeps.

        Returns how long the caller may wait before the next call (at most ``max_wait``).
        """
        with self._lock:
            now = self.clock()
            wait = max_wait
            for name, child in self._children.items():
                if child.state.restart_at is None and child.proc.poll() is not None:
                    child.state = after_exit(child.state, self.policy, now)
                    self.log.error("%s (pid %d) exited with %s; restarting in %.1f s (exit %d in a row)", name,
                                   child.proc.pid, child.proc.returncode, child.state.restart_at - now,
                                   child.state.failures)
                if is_due(child.state, now):
                    child.proc = spawn(child.spec)
                    child.state = after_start(child.state, now)
                    self.restarts += 1
                    self.log.warning("%s restarted (pid %d)", name, child.proc.pid)
                if child.state.restart_at is not None:
                    wait = min(wait, max(0.0, child.state.restart_at - now))
            return wait

    def stop(self, names: Sequence[str] | None = None, timeout: float | None = None) -> None:
        """Stop children (all when ``names`` is None) together: SIGTERM, wait for them to drain, kill the late.

        ``timeout`` overrides each spec's own ``stop_timeout_s``.
        """
        self.await_stopped(self.terminate(names), timeout)

    def terminate(self, names: Sequence[str] | None = None) -> list[Stopping]:
        """Send SIGTERM to children (all when ``names`` is None); they are no longer supervised from now on."""
        with self._lock:
            chosen = [n for n in (list(self._children) if names is None else names) if n in self._children]
            children = [self._children.pop(n) for n in chosen]
            for c in children:
                if c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
            return [Stopping(c.spec, c.proc) for c in children]

    def await_stopped(self, stopping: Sequence[Stopping], timeout: float | None = None) -> None:
        """Wait for terminated children to exit; kill those still there after their timeout."""
        t0 = self.clock()
        for c in stopping:
            limit = timeout if timeout is not None else c.spec.stop_timeout_s
            try:
                c.proc.wait(max(0.1, t0 + limit - self.clock()))
                self.log.info("%s (pid %d) stopped in %.1f s (exit %s)", c.spec.name, c.proc.pid,
                              self.clock() - t0, c.proc.returncode)
            except subprocess.TimeoutExpired:
                self.log.warning("%s (pid %d) did not stop in %.0f s; killed", c.spec.name, c.proc.pid, limit)
                c.proc.kill()
                c.proc.wait()
