"""Reading lag from a real JetStream: per-partition pending/unacked, and the institutions of studies in flight."""

from __future__ import annotations

import asyncio

import nats

from services.autoscaler.decision import History, decide
from services.autoscaler.lag import read_lag
from shared.bus.connection import ensure_streams
from shared.bus.consumer_group import AllPartitions, PartitionedConsumer, durable_name
from shared.bus.jetstream import PinnedPuller
from shared.bus.partitioning import partition_of
from shared.config import Config
from tests.autoscaler_harness import publish_studies, study_uid
from tests.helpers import make_config


async def _consumers(config: Config) -> None:
    nc = await nats.connect(config.nats_servers()[0])
    try:
        await ensure_streams(nc, config)
        await PartitionedConsumer(nc, config.stream.name, "store", config.stream.partitions, None, config.store.group,
                                  AllPartitions(config.stream.partitions), "none").ensure_consumers()
    finally:
        await nc.close()


async def _take(config: Config, partition: int, n: int) -> None:
    """Deliver ``n`` events of one partition without acknowledging them (a worker in the middle of a study)."""
    nc = await nats.connect(config.nats_servers()[0])
    try:
        puller = PinnedPuller(nc, config.stream.name, durable_name("store", partition))
        got = 0
        while got < n:
            got += len((await puller.fetch(n - got, expires_s=2.0)).messages)
        await puller.close()
    finally:
        await nc.close()


async def _read(config: Config, heads: bool):
    nc = await nats.connect(config.nats_servers()[0])
    try:
        return await read_lag(nc, config.stream.name, config.stream.partitions, ["store", "router"],
                              with_heads=["store"] if heads else [])
    finally:
        await nc.close()


def test_lag_per_partition_and_institutions_in_flight(tmp_path, nats_server):
    config = Config.model_validate(make_config(tmp_path, nats_server.url))
    asyncio.run(_consumers(config))
    a, b = study_uid(1, run=3), study_uid(2, run=3)
    pa, pb = partition_of(a, 8), partition_of(b, 8)
    assert pa != pb
    publish_studies(config, [(a, 5)], institution="HOSP_A")
    publish_studies(config, [(b, 7)], institution="HOSP_B")
    asyncio.run(_take(config, pa, 2))

    observed = asyncio.run(_read(config, heads=True))
    assert observed["router"].partitions == ()  # no consumers of that group: no lag, no error
    store = observed["store"]
    rows = {p.partition: p for p in store.partitions}
    assert len(rows) == 8 and store.lag == 12 and store.backlog_partitions == 2 and store.inflight_partitions == 1
    assert (rows[pa].pending, rows[pa].ack_pending, rows[pb].pending, rows[pb].ack_pending) == (3, 2, 7, 0)
    assert rows[pa].institutions == ("AUTOSCALE", "HOSP_A") and rows[pb].institutions == ("AUTOSCALE", "HOSP_B")
    assert store.institutions_in_flight() == {"AUTOSCALE", "HOSP_A", "HOSP_B"}
    # Without floors configured the heads are not read at all.
    assert all(p.institutions == () for p in asyncio.run(_read(config, heads=False))["store"].partitions)

    policy = config.autoscaler.groups["store"].model_copy(update={"institution_floors": {"HOSP_B": 3}})
    d, _ = decide("store", policy, store, 1, 100.0, History())
    assert (d.metric_proposal, d.clamp, d.desired) == (1, "InstitutionFloor:HOSP_B", 3), d.explain()
