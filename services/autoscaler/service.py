"""The autoscaler process: every ``interval_s``, read each group's lag, decide, explain, actuate.

Actuators: :class:`~services.autoscaler.local_workers.LocalWorkers` (processes on this machine, the
embedded default) or :class:`~services.autoscaler.kubernetes_scale.KubernetesScale` (the scale
subresource). In dry-run mode a :class:`DryRun` stands in front of the actuator: it reads the real
count once and then follows its own decisions, so the log shows what would happen, rate limits
included, while nothing changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from shared.bus.connection import connect, ensure_streams
from shared.config import Config
from shared.lifecycle import stop_on_signals
from shared.telemetry import add_health_check, start_metrics

from . import metrics
from .decision import Decision, History, decide
from .lag import read_lag

log = logging.getLogger("dicomflow.autoscaler")


class Actuator(Protocol):
    """What the autoscaler needs from a workload: its replica count, and a way to change it."""

    def current(self, group: str) -> int: ...

    def scale_to(self, group: str, replicas: int) -> None: ...

    def reconcile(self) -> int: ...

    def close(self) -> None: ...


class DryRun:
    """Decide and report, change nothing: the count starts from the real one and follows the decisions."""

    def __init__(self, inner: Actuator | None, initial: dict[str, int] | None = None):
        self.inner = inner
        self.initial = initial or {}
        self.counts: dict[str, int] = {}

    def current(self, group: str) -> int:
        if group not in self.counts:
            self.counts[group] = self.initial[group] if group in self.initial else (
                self.inner.current(group) if self.inner else 0)
        return self.counts[group]

    def scale_to(self, group: str, replicas: int) -> None:
        log.info("%s: dry run, would scale to %d", group, replicas)
        self.counts[group] = replicas

    def reconcile(self) -> int:
        return 0

    def close(self) -> None:
        pass


class Autoscaler:
    """The control loop's state: one HPA history per group."""

    def __init__(self, config: Config, actuator: Actuator, on_decision: Callable[[Decision], None] | None = None):
        self.config = config
        self.actuator = actuator
        self.on_decision = on_decision
        self.groups = {g: p for g, p in config.autoscaler.groups.items() if p.enabled}
        self.history = {g: History() for g in self.groups}
        self._last: dict[str, tuple] = {}

    async def tick(self, nc) -> list[Decision]:
        """One round: read lag, decide each group, actuate the changes. Returns the decisions."""
        try:
            observed = await read_lag(nc, self.config.stream.name, self.config.stream.partitions, self.groups,
                                      with_heads=[g for g, p in self.groups.items() if p.institution_floors])
        except Exception as exc:
            log.warning("lag unreadable, no decision this round: %s", exc)
            for g in self.groups:
                metrics.errors.labels(g, "lag").inc()
            return []
        out = []
        for group, policy in self.groups.items():
            obs = observed[group]
            metrics.export_lag(group, obs, policy.target_lag)
            try:
                current = await asyncio.to_thread(self.actuator.current, group)
            except Exception as exc:
                log.warning("%s: replica count unreadable: %s", group, exc)
                metrics.errors.labels(group, "read").inc()
                continue
            now = time.monotonic()
            d, self.history[group] = decide(group, policy, obs, current, now, self.history[group])
            self._explain(d)
            metrics.export_decision(d)
            if d.desired != current:
                try:
                    await asyncio.to_thread(self.actuator.scale_to, group, d.desired)
                except Exception as exc:
                    log.error("%s: scaling to %d failed: %s", group, d.desired, exc)
                    metrics.errors.labels(group, "scale").inc()
                else:
                    self.history[group] = self.history[group].with_scale(now, current, d.desired)
                    metrics.scalings.labels(group, d.direction).inc()
            if self.on_decision:
                self.on_decision(d)
            out.append(d)
        await asyncio.to_thread(self.actuator.reconcile)
        return out

    def _explain(self, d: Decision) -> None:
        # Every new situation gets its line; an unchanged steady state is logged at debug level only.
        key = (d.current, d.metric_proposal, d.proposal, d.desired, d.reason, d.clamp)
        level = logging.INFO if d.direction != "none" or self._last.get(d.group) != key else logging.DEBUG
        self._last[d.group] = key
        log.log(level, "decision %s", d.explain())


async def serve(config: Config, actuator: Actuator, metrics_port: int | None = None,
                stop: asyncio.Event | None = None, on_decision: Callable[[Decision], None] | None = None,
                once: bool = False) -> list[Decision]:
    """Run the control loop until SIGTERM/SIGINT (or ``stop``); then let the actuator drain its workers.

    With ``once``, decide one round and return its decisions.
    """
    start_metrics(config.telemetry, metrics_port)
    nc = await connect(config, "dicomflow-autoscaler")
    # Like every service: the stream exists before anyone reads it, so the first decision (min_replicas) is taken.
    await ensure_streams(nc, config)
    add_health_check("nats", lambda: nc.is_connected)
    scaler = Autoscaler(config, actuator, on_decision)
    stop = stop or asyncio.Event()
    stop_on_signals(stop)
    log.info("autoscaler: groups %s every %.1f s%s", sorted(scaler.groups), config.autoscaler.interval_s,
             " (dry run)" if isinstance(actuator, DryRun) else "")
    decisions: list[Decision] = []
    try:
        while not stop.is_set():
            decisions = await scaler.tick(nc)
            if once:
                break
            try:
                await asyncio.wait_for(stop.wait(), config.autoscaler.interval_s)
            except TimeoutError:
                pass
    finally:
        log.info("autoscaler stopping")
        await asyncio.to_thread(actuator.close)
        await nc.drain()
    return decisions
