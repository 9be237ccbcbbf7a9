"""The router process: a member of the ``router`` consumer group, the forwarders of every target,
the completion scanner, the target prober, and configuration reloads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from shared.audit import records as audit_records
from shared.audit import trail as audit
from shared.bus.connection import connect, ensure_streams
from shared.bus.consumer_group import AllPartitions, Ownership, PartitionedConsumer
from shared.bus.jetstream import ensure_stream
from shared.bus.membership import ElasticOwnership, default_member_name
from shared.config import Config, ConfigError
from shared.contract import subjects
from shared.lifecycle import cancel_and_wait, stop_on_signals
from shared.storage.objectstore import Backends
from shared.telemetry import add_health_check, setup_tracing, start_metrics

from . import metrics
from .forwarder import Forwarder
from .routing import Router
from .rules import RulesError, RuleSet, load_rules
from .spool import Spool, spool_root
from .state import open_state
from .targets import check_targets, target_for

log = logging.getLogger("dicomflow.router")

GROUP = "router"


def rules_of(config: Config) -> RuleSet:
    """The configured rules, validated against the configured targets and groups (raises RulesError/OSError)."""
    if not config.router.rules_file:
        return RuleSet((), "")
    return load_rules(config.router.rules_file, [*config.router.targets, *config.router.groups])


def _mtime(path: str | None) -> float:
    try:
        return os.stat(path).st_mtime if path else 0.0
    except OSError:
        return 0.0


async def _tcp_up(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


class RouterService:
    """Everything one router member runs, started and stopped together."""

    def __init__(self, config: Config, rules: RuleSet, reload: Callable[[], Config] | None = None,
                 config_path: str | None = None):
        self.config = config
        self.rules = rules
        self.reload = reload
        self.config_path = config_path
        self.forwarders: dict[str, Forwarder] = {}
        self._tasks: list[asyncio.Task] = []

    async def start(self, ownership: Ownership | None = None) -> None:
        config = self.config
        self.member = default_member_name(GROUP)
        self.nc = await connect(config, f"dicomflow-router-{self.member}")
        await ensure_streams(self.nc, config)
        await ensure_stream(self.nc, subjects.out_stream_config(config.stream))
        await ensure_stream(self.nc, subjects.dlq_stream_config(config.stream))
        self.book, assignments, health = await open_state(self.nc, config.router.study_ttl_days, config.stream.replicas)
        await self.book.start_watch()
        self.router = Router(config, self.rules, self.nc, self.book, assignments, health)
        self.backends = Backends(config)
        self.spool = await asyncio.to_thread(Spool, spool_root(config.router.forward.spool_dir))
        await self._sync_forwarders()
        gcfg = config.router.group
        if ownership is None:
            ownership = (ElasticOwnership(self.nc, GROUP, self.member, config.stream.partitions, gcfg,
                                          config.stream.replicas)
                         if gcfg.elastic else AllPartitions(config.stream.partitions))
        self.consumer = PartitionedConsumer(self.nc, config.stream.name, GROUP, config.stream.partitions,
                                            self.router.handle_batch, gcfg, ownership, self.member,
                                            span_name="router.instance")
        await self.consumer.start()
        self._tasks = [asyncio.create_task(self._every(lambda: self.config.router.scan_interval_s, self.router.scan),
                                           name="router-scan"),
                       asyncio.create_task(self._every(lambda: self.config.router.forward.probe_interval_s,
                                                       self.probe), name="router-probe"),
                       asyncio.create_task(self._every(lambda: self.config.router.reload_interval_s,
                                                       self.check_reload), name="router-reload")]
        self._mtimes = (_mtime(self.config_path), _mtime(config.router.rules_file))
        log.info("router member %s: %d rules, %d targets, %d groups", self.member, len(self.rules.rules),
                 len(config.router.targets), len(config.router.groups))

    async def _every(self, interval: Callable[[], float], work) -> None:
        while True:
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed", getattr(work, "__name__", work))
            await asyncio.sleep(interval())

    async def _sync_forwarders(self) -> None:
        targets = set(self.config.router.targets)
        for name in sorted(set(self.forwarders) - targets):
            await self.forwarders.pop(name).stop()
        for name in sorted(targets - set(self.forwarders)):
            fwd = Forwarder(self.nc, self.router, self.backends, name, self.spool)
            await fwd.start()
            self.forwarders[name] = fwd

    async def probe(self) -> None:
        """Mark each target up or down by whether its port accepts a connection."""
        for name, tcfg in list(self.config.router.targets.items()):
            host, port = target_for(tcfg, self.config.router.forward.calling_ae).probe_address()
            up = await _tcp_up(host, port)
            await self.router.health.set(name, up)
            metrics.target_up.labels(name).set(1 if up else 0)

    async def check_reload(self) -> None:
        """Reload targets, groups and rules when the config or rules file changed; keep the old ones if invalid."""
        if self.reload is None:
            return
        mtimes = (_mtime(self.config_path), _mtime(self.config.router.rules_file))
        if mtimes == self._mtimes:
            return
        self._mtimes = mtimes
        try:
            config = self.reload()
            rules = rules_of(config)
        except (ConfigError, RulesError, OSError) as exc:
            log.error("configuration change not applied (keeping the running one): %s", exc)
            audit.emit(audit_records.configuration_changed("router", _effective(self.config, self.rules), None,
                                                           f"not applied: {exc}"))
            return
        audit.emit(audit_records.configuration_changed("router", _effective(self.config, self.rules),
                                                       _effective(config, rules)))
        self.config, self.rules = config, rules
        self.router.reconfigure(config, rules)
        await self._sync_forwarders()
        self._mtimes = (_mtime(self.config_path), _mtime(config.router.rules_file))
        log.info("reloaded: %d rules, targets %s, groups %s", len(rules.rules), sorted(config.router.targets),
                 {g: sorted(c.members) for g, c in config.router.groups.items()})

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        await self.consumer.stop()
        await asyncio.gather(*(f.stop() for f in self.forwarders.values()))
        await self.book.stop()
        await self.nc.drain()
        self.backends.close()
        self.spool.close()


def _effective(config: Config, rules: RuleSet) -> dict:
    """What the router runs with, for the audit record of a reload: the configuration and the rules."""
    return {**config.model_dump(mode="json"), "rules": repr(rules.rules)}


async def serve(config: Config, metrics_port: int | None = None, stop: asyncio.Event | None = None,
                ownership: Ownership | None = None, reload: Callable[[], Config] | None = None,
                config_path: str | None = None) -> None:
    """Run one router member until SIGTERM/SIGINT (or ``stop``).

    Invalid rules raise RulesError, and targets this process cannot send to (dcmtk missing) TargetsUnusable,
    at once: a router that starts anyway would only fill its queues with jobs no retry can deliver.
    """
    rules = rules_of(config)
    check_targets(config)
    setup_tracing("router", config.telemetry)
    start_metrics(config.telemetry, metrics_port)
    audit.install(config, "router")
    service = RouterService(config, rules, reload, config_path)
    await service.start(ownership)
    stop = stop or asyncio.Event()
    add_health_check("nats", lambda: service.nc.is_connected)
    add_health_check("group_member", lambda: not stop.is_set())
    stop_on_signals(stop)
    t0 = time.monotonic()
    await stop.wait()
    log.info("router member %s leaving after %.0fs: finishing in-flight work", service.member, time.monotonic() - t0)
    await service.stop()
    await asyncio.to_thread(audit.close, 2)
