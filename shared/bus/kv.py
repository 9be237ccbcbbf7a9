"""JetStream KV buckets: the one way dicomflow keeps shared state (group membership, the router's state).

Reads, writes, compare-and-set and watches go through nats-py's ``KeyValue``. Three calls are raw
JetStream API, for reasons measured against a local nats-server (a bucket of 6 keys):

- :func:`open_bucket` declares the bucket's stream with :func:`~shared.bus.jetstream.ensure_stream`,
  so a changed TTL or replica count updates an existing bucket (``create_key_value`` leaves it as it
  was) and a cluster electing its leader is waited out.
- :func:`live_keys` is one ``STREAM.INFO`` with a subjects filter: 0.28 ms. nats-py's ``keys()``
  creates an ordered consumer and reads every entry: 1.8 ms, at every member's heartbeat pace.
- :meth:`Bucket.remove` purges the key's subject, so the key leaves that listing at once;
  ``KeyValue.delete``/``purge`` leave a marker message, which the listing counts as a live key until
  it ages out. Buckets whose keys are listed use ``remove``, never ``delete``.
"""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared.bus.jetstream import NS, JetStreamAPIError, api, ensure_stream

# A create of an existing key, or an update whose revision is no longer the latest: re-read and re-decide.
Conflict = KeyWrongLastSequenceError

Entry = KeyValue.Entry

_STREAM_NOT_FOUND = 10059


def stream_name(bucket: str) -> str:
    """The stream that holds a bucket (the layout nats-py and the nats CLI use)."""
    return f"KV_{bucket}"


def stream_config(bucket: str, ttl_s: float = 0, replicas: int = 1) -> dict:
    """Raw stream config of a bucket that keeps the latest value per key; ``ttl_s`` 0: values never expire."""
    ttl = int(ttl_s * NS)
    return {
        "name": stream_name(bucket),
        "subjects": [f"$KV.{bucket}.>"],
        "retention": "limits",
        "storage": "file",
        "num_replicas": replicas,
        "max_msgs_per_subject": 1,
        "max_age": ttl,
        "duplicate_window": min(ttl, 120 * NS) if ttl else 120 * NS,
        "discard": "new",
        "allow_rollup_hdrs": True,
        "deny_delete": True,
        "allow_direct": True,
    }


class Bucket:
    """One KV bucket. Values are bytes; revisions are the stream sequences of the writes."""

    def __init__(self, nc: NATS, name: str, kv: KeyValue):
        self.nc = nc
        self.name = name
        self._kv = kv

    async def get(self, key: str) -> Entry | None:
        """The latest entry (value and revision) of ``key``; None when it has none or was deleted."""
        try:
            return await self._kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None

    async def create(self, key: str, value: bytes) -> int:
        """Write ``key`` only if it holds nothing; returns the revision, raises :data:`Conflict` otherwise."""
        return await self._kv.create(key, value)

    async def update(self, key: str, value: bytes, revision: int) -> int:
        """Compare-and-set: write only if ``revision`` is still the latest; raises :data:`Conflict` otherwise."""
        return await self._kv.update(key, value, last=revision)

    async def put(self, key: str, value: bytes) -> int:
        """Write ``key`` whatever it holds; returns the revision."""
        return await self._kv.put(key, value)

    async def delete(self, key: str) -> None:
        """Delete ``key`` with a marker that watchers see (the key still counts in :meth:`keys` until it ages out)."""
        await self._kv.delete(key)

    async def remove(self, key: str) -> None:
        """Remove ``key`` and its history at once (gone from :meth:`keys`; watchers are not told)."""
        await api(self.nc, f"STREAM.PURGE.{stream_name(self.name)}", {"filter": f"$KV.{self.name}.{key}"})

    async def keys(self) -> list[str]:
        """The keys holding a message, sorted."""
        return await live_keys(self.nc, self.name)

    async def watch(self) -> KeyValue.KeyWatcher:
        """Every key's latest entry, then each change as it happens (``updates()`` gives None once the
        initial entries are delivered)."""
        return await self._kv.watchall()


async def open_bucket(nc: NATS, name: str, ttl_s: float = 0, replicas: int = 1, timeout: float = 5.0) -> Bucket:
    """Open a bucket, creating it (or updating its TTL and replicas) as configured; idempotent across members.

    ``timeout`` bounds each of its reads and writes.
    """
    await ensure_stream(nc, stream_config(name, ttl_s, replicas))
    return Bucket(nc, name, await nc.jetstream(timeout=timeout).key_value(name))


async def existing_bucket(nc: NATS, name: str, timeout: float = 5.0) -> Bucket | None:
    """A bucket that exists, without creating it (None when it does not: a reader such as ``dicomflow status``)."""
    try:
        return Bucket(nc, name, await nc.jetstream(timeout=timeout).key_value(name))
    except BucketNotFoundError:
        return None


async def live_keys(nc: NATS, name: str) -> list[str]:
    """The keys of bucket ``name`` that hold a message, sorted (empty when the bucket does not exist)."""
    try:
        info = await api(nc, f"STREAM.INFO.{stream_name(name)}", {"subjects_filter": f"$KV.{name}.>"})
    except JetStreamAPIError as exc:
        if exc.err_code == _STREAM_NOT_FOUND:
            return []
        raise
    prefix = f"$KV.{name}."
    return sorted(s[len(prefix):] for s, n in (info["state"].get("subjects") or {}).items() if n)
