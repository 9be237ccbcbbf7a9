"""The one KV module (membership and router state), against a real nats-server."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.js.api import KeyValueConfig

from shared.bus.kv import Conflict, existing_bucket, live_keys, open_bucket


def _run(url: str, coro_fn):
    async def go():
        nc = await nats.connect(url)
        try:
            return await coro_fn(nc)
        finally:
            await nc.close()
    return asyncio.run(go())


def test_create_get_compare_and_set_put_and_watch(nats_server):
    async def go(nc):
        b = await open_bucket(nc, "t_state", ttl_s=60)
        assert await b.get("k") is None
        rev = await b.create("k", b"1")
        with pytest.raises(Conflict):
            await b.create("k", b"other")  # the first create wins
        entry = await b.get("k")
        assert (entry.value, entry.revision) == (b"1", rev)
        rev2 = await b.update("k", b"2", rev)
        with pytest.raises(Conflict):
            await b.update("k", b"3", rev)  # stale revision: someone changed it meanwhile
        assert (await b.get("k")).value == b"2" and rev2 > rev
        await b.put("h", b"up")
        watcher = await b.watch()
        initial = {}
        while (e := await watcher.updates(timeout=5)) is not None:
            initial[e.key] = e.value
        assert initial == {"k": b"2", "h": b"up"}
        await b.put("h", b"down")
        change = await watcher.updates(timeout=5)
        assert (change.key, change.value) == ("h", b"down")
        await watcher.stop()
        await b.delete("h")
        assert await b.get("h") is None

    _run(nats_server.url, go)


def test_a_removed_key_leaves_the_listing_at_once_a_deleted_one_does_not(nats_server):
    """Why membership leaves with remove(): a delete marker still counts as a live key."""
    async def go(nc):
        assert await live_keys(nc, "t_members") == [], "no bucket: nobody"
        assert await existing_bucket(nc, "t_members") is None
        b = await open_bucket(nc, "t_members", ttl_s=30)
        for k in ("a", "b", "c"):
            await b.put(k, b"{}")
        await b.remove("a")
        await b.delete("b")
        return await b.keys(), await live_keys(nc, "t_members")

    keys, listed = _run(nats_server.url, go)
    assert keys == listed == ["b", "c"]


def test_open_updates_the_ttl_of_a_bucket_created_elsewhere(nats_server):
    """A bucket nats-py created (the router's, before) takes the configured TTL instead of keeping its own."""
    async def go(nc):
        js = nc.jetstream()
        await js.create_key_value(KeyValueConfig(bucket="t_ttl", history=1, ttl=60))
        b = await open_bucket(nc, "t_ttl", ttl_s=120)
        await b.put("k", b"v")
        info = await js.stream_info("KV_t_ttl")
        return info.config.max_age, (await b.get("k")).value

    max_age, value = _run(nats_server.url, go)
    assert max_age == 120 and value == b"v"
