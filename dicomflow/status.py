"""``dicomflow status``: the stream, its partitions, the consumers and their lag."""

from __future__ import annotations

from nats.aio.client import Client as NATS

from shared.config import Config
from shared.consumer_group import durable_name
from shared.jetstream_raw import JetStreamAPIError, api


async def collect(nc: NATS, config: Config, groups: tuple[str, ...] = ("store", "router")) -> dict:
    """Stream state plus, per consumer group, each partition's pending, unacked and pinned client."""
    stream = config.stream.name
    info = await api(nc, f"STREAM.INFO.{stream}")
    out: dict = {"stream": {"name": stream, "messages": info["state"]["messages"], "bytes": info["state"]["bytes"],
                            "first_seq": info["state"]["first_seq"], "last_seq": info["state"]["last_seq"],
                            "partitions": config.stream.partitions, "replicas": info["config"].get("num_replicas"),
                            "cluster": info.get("cluster", {})},
                 "groups": {}}
    for group in groups:
        parts = []
        for p in range(config.stream.partitions):
            try:
                ci = await api(nc, f"CONSUMER.INFO.{stream}.{durable_name(group, p)}")
            except JetStreamAPIError:
                continue
            pins = [g.get("pinned_client_id") for g in ci.get("priority_groups", []) or [] if g.get("pinned_client_id")]
            parts.append({"partition": p, "pending": ci["num_pending"], "ack_pending": ci["num_ack_pending"],
                          "redelivered": ci["num_redelivered"], "lag": ci["num_pending"] + ci["num_ack_pending"],
                          "pinned_id": pins[0] if pins else None})
        if parts:
            out["groups"][group] = {"lag": sum(x["lag"] for x in parts),
                                    "partitions_with_backlog": sum(1 for x in parts if x["lag"] > 0),
                                    "partitions": parts}
    return out
