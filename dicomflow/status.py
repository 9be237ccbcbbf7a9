"""``dicomflow status``: the stream, its partitions, each consumer group's members, what each owns and
holds pinned, and the lag per partition."""

from __future__ import annotations

import time

from nats.aio.client import Client as NATS

from shared.bus.consumer_group import durable_name
from shared.bus.jetstream import JetStreamAPIError, api
from shared.bus.membership import member_reports
from shared.bus.rendezvous import owner_of
from shared.config import Config


async def collect(nc: NATS, config: Config, groups: tuple[str, ...] = ("store", "router")) -> dict:
    """Stream state plus, per consumer group: live members (with the partitions each owns and the pins
    it holds) and each partition's pending, unacked, pinned id, owner and lag."""
    stream = config.stream.name
    info = await api(nc, f"STREAM.INFO.{stream}")
    out: dict = {"stream": {"name": stream, "messages": info["state"]["messages"], "bytes": info["state"]["bytes"],
                            "first_seq": info["state"]["first_seq"], "last_seq": info["state"]["last_seq"],
                            "partitions": config.stream.partitions, "replicas": info["config"].get("num_replicas"),
                            "cluster": info.get("cluster", {})},
                 "groups": {}}
    for group in groups:
        reports = await member_reports(nc, group)
        members = {m: {"owned": r.get("owned", []), "pins": r.get("pins", {}), "host": r.get("host"),
                       "pid": r.get("pid"), "up_s": round(time.time() - r["since"], 1) if r.get("since") else None,
                       "heartbeat_age_s": round(time.time() - r["ts"], 1) if r.get("ts") else None}
                   for m, r in reports.items()}
        pin_holder = {pin: m for m, r in members.items() for pin in r["pins"].values()}
        parts = []
        for p in range(config.stream.partitions):
            try:
                ci = await api(nc, f"CONSUMER.INFO.{stream}.{durable_name(group, p)}")
            except JetStreamAPIError:
                continue
            pins = [g.get("pinned_client_id") for g in ci.get("priority_groups", []) or [] if g.get("pinned_client_id")]
            pinned = pins[0] if pins else None
            parts.append({"partition": p, "pending": ci["num_pending"], "ack_pending": ci["num_ack_pending"],
                          "redelivered": ci["num_redelivered"], "lag": ci["num_pending"] + ci["num_ack_pending"],
                          "pinned_id": pinned,
                          # Who holds the pin (from the members' reports), else who should own it.
                          "owner": pin_holder.get(pinned) if pinned else None,
                          "assigned": owner_of(p, members) if members else None})
        if parts or members:
            out["groups"][group] = {"lag": sum(x["lag"] for x in parts),
                                    "partitions_with_backlog": sum(1 for x in parts if x["lag"] > 0),
                                    "members": members,
                                    "partitions": parts}
    return out


def format_text(st: dict) -> str:
    """The human-readable ``dicomflow status``: stream, then per group its members and busy partitions."""
    s = st["stream"]
    lines = [f"stream {s['name']}: {s['messages']} messages, {s['bytes']} bytes, {s['partitions']} partitions"]
    for name, g in st["groups"].items():
        lines.append(f"group {name}: {len(g.get('members', {}))} members, lag {g['lag']}, "
                     f"{g['partitions_with_backlog']} partitions with backlog")
        for m, info in sorted(g.get("members", {}).items()):
            lines.append(f"  member {m} ({info.get('host')}, pid {info.get('pid')}): owns {info['owned']}")
        for p in g["partitions"]:
            if p["lag"] or p["pinned_id"]:
                lines.append(f"  p{p['partition']:02d} pending={p['pending']} unacked={p['ack_pending']} "
                             f"pinned={p['pinned_id']} owner={p['owner'] or p['assigned']}")
    return "\n".join(lines)
