"""The store process: a member of the ``store`` consumer group."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from shared.audit import trail as audit
from shared.bus.connection import connect, ensure_streams
from shared.bus.consumer_group import AllPartitions, Ownership, PartitionedConsumer
from shared.bus.membership import ElasticOwnership, default_member_name
from shared.catalogue.open import open_catalogue
from shared.config import Config
from shared.lifecycle import settle_after_startup, stop_on_signals
from shared.storage.objectstore import Backends
from shared.telemetry import add_health_check, setup_tracing, start_metrics

from .storing import Storer

log = logging.getLogger("dicomflow.store")

GROUP = "store"


async def serve(config: Config, metrics_port: int | None = None, stop: asyncio.Event | None = None,
                ownership: Ownership | None = None) -> None:
    """Run one store member until SIGTERM/SIGINT (or ``stop``), then leave the group gracefully.

    By default the member shares the partitions with the other live store members (elastic
    membership); ``store.group.elastic: false`` or an explicit ``ownership`` overrides that.
    """
    setup_tracing("store", config.telemetry)
    start_metrics(config.telemetry, metrics_port)
    audit.install(config, "store")
    # Placement writes block one thread each; the default pool (cores + 4) would cap concurrent object
    # writes well below the RADOS aio window and the number of partitions handled at once.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=32, thread_name_prefix="store-io"))
    member = default_member_name(GROUP)
    nc = await connect(config, f"dicomflow-store-{member}")
    await ensure_streams(nc, config)
    backends = Backends(config)
    catalogue = open_catalogue(config.catalogue.url, config.data_path())
    storer = Storer(config, nc.jetstream(), backends, catalogue)
    gcfg = config.store.group
    if ownership is None:
        ownership = (ElasticOwnership(nc, GROUP, member, config.stream.partitions, gcfg, config.stream.replicas)
                     if gcfg.elastic else AllPartitions(config.stream.partitions))
    consumer = PartitionedConsumer(nc, config.stream.name, GROUP, config.stream.partitions, storer.handle_batch,
                                   gcfg, ownership, member)
    await consumer.start()
    if stop is None:  # this process is the service (not embedded in a test or benchmark)
        settle_after_startup()
    stop = stop or asyncio.Event()
    # Ready while connected and a group member; not ready from SIGTERM on (it is leaving the group).
    add_health_check("nats", lambda: nc.is_connected)
    add_health_check("group_member", lambda: not stop.is_set())
    stop_on_signals(stop)
    log.info("store member %s joined (%d partitions in the stream)", member, config.stream.partitions)
    await stop.wait()
    log.info("store member %s leaving: finishing in-flight work", member)
    await consumer.stop()
    await nc.drain()
    catalogue.close()
    backends.close()
    await asyncio.to_thread(audit.close, 2)
