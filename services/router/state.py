"""The router's shared state in JetStream KV buckets: study states, sticky assignments, target health.

KV rather than memory so a study survives its router member: any member can pick it up (after a
crash or an ownership move) and compare-and-set updates keep concurrent members from losing one
another's changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from nats.aio.client import Client as NATS

from shared.bus.kv import Bucket, Conflict, open_bucket
from shared.contract import subjects
from shared.contract.uids import uid_token
from shared.lifecycle import cancel_and_wait

from .completion import StudyState

log = logging.getLogger("dicomflow.router.state")


class StudyBook:
    """Study states keyed by StudyInstanceUID, with a local mirror kept current by a KV watch."""

    def __init__(self, kv: Bucket):
        self.kv = kv
        self.mirror: dict[str, StudyState] = {}
        self._watch_task: asyncio.Task | None = None
        self.ready = asyncio.Event()

    @staticmethod
    def key(study_uid: str) -> str:
        return uid_token(study_uid)

    async def get(self, study_uid: str) -> tuple[StudyState | None, int]:
        """The stored state and its revision (0 when none)."""
        entry = await self.kv.get(self.key(study_uid))
        if entry is None or not entry.value:
            return None, 0
        return StudyState.model_validate_json(entry.value), entry.revision

    async def update(self, study_uid: str, change: Callable[[StudyState | None], StudyState | None],
                     read: tuple[StudyState | None, int] | None = None) -> tuple[StudyState | None, StudyState | None]:
        """Apply ``change`` with compare-and-set, retrying on conflicts; returns (before, after).

        ``change`` returns None for "nothing to write" (after is then None). ``read``: the state and revision
        the caller just got, tried first (a conflict re-reads).
        """
        key = self.key(study_uid)
        for _ in range(100):
            before, rev = read if read is not None else await self.get(study_uid)
            read = None
            after = change(before)
            if after is None:
                return before, None
            data = after.model_dump_json().encode()
            try:
                if rev:
                    await self.kv.update(key, data, rev)
                else:
                    await self.kv.create(key, data)
            except Conflict:
                continue  # another member changed it: re-read and re-decide
            self.mirror[study_uid] = after
            return before, after
        raise RuntimeError(f"study {study_uid}: too many concurrent updates")

    async def start_watch(self) -> None:
        """Mirror every study state (initial values, then updates) in the background."""
        self._watch_task = asyncio.create_task(self._watch(), name="router-studies-watch")

    async def _watch(self) -> None:
        while True:
            try:
                watcher = await self.kv.watch()
                while True:
                    entry = await watcher.updates(timeout=60 * 60 * 24)
                    if entry is None:
                        self.ready.set()  # initial values delivered
                        continue
                    uid = entry.key.replace("_", ".")
                    if entry.operation in ("DEL", "PURGE") or not entry.value:
                        self.mirror.pop(uid, None)
                    else:
                        try:
                            self.mirror[uid] = StudyState.model_validate_json(entry.value)
                        except ValueError:
                            log.warning("undecodable study state %s dropped from the mirror", entry.key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS reconnecting: watch again (initial values re-sync the mirror)
                log.debug("study watch: %s", exc)
                await asyncio.sleep(1)

    async def stop(self) -> None:
        await cancel_and_wait(self._watch_task)


class Assignments:
    """Sticky study -> target choices per group: the first choice wins cluster-wide (KV create)."""

    def __init__(self, kv: Bucket):
        self.kv = kv

    @staticmethod
    def key(group: str, study_uid: str) -> str:
        return f"{group}.{uid_token(study_uid)}"

    async def get(self, group: str, study_uid: str) -> tuple[str | None, int]:
        entry = await self.kv.get(self.key(group, study_uid))
        if entry is None or not entry.value:
            return None, 0
        return entry.value.decode(), entry.revision

    async def claim(self, group: str, study_uid: str, target: str) -> tuple[str, bool]:
        """Record ``target`` unless the study already has one; returns (the target, whether we set it)."""
        try:
            await self.kv.create(self.key(group, study_uid), target.encode())
            return target, True
        except Conflict:
            current, _ = await self.get(group, study_uid)
            if current is None:
                raise
            return current, False

    async def move(self, group: str, study_uid: str, old: str, new: str) -> tuple[str, bool]:
        """Move the study from ``old`` to ``new`` unless someone already moved it; returns (target, moved)."""
        current, rev = await self.get(group, study_uid)
        if current != old or not rev:
            return current or new, False
        try:
            await self.kv.update(self.key(group, study_uid), new.encode(), rev)
            return new, True
        except Conflict:
            current, _ = await self.get(group, study_uid)
            return current or new, False


class Health:
    """Which targets accept connections, shared by the members (each member probes, last word wins)."""

    def __init__(self, kv: Bucket):
        self.kv = kv
        self.local: dict[str, bool] = {}

    async def set(self, target: str, up: bool) -> None:
        if self.local.get(target) == up:
            return
        self.local[target] = up
        await self.kv.put(target, json.dumps({"up": up, "at": time.time()}).encode())

    async def is_up(self, target: str) -> bool:
        entry = await self.kv.get(target)
        if entry is None or not entry.value:
            return self.local.get(target, True)
        return bool(json.loads(entry.value).get("up", True))


async def open_state(nc: NATS, study_ttl_days: float, replicas: int) -> tuple[StudyBook, Assignments, Health]:
    """Open (creating when missing) the three buckets."""
    studies = await open_bucket(nc, subjects.STUDIES_BUCKET, study_ttl_days * 86400, replicas)
    assign = await open_bucket(nc, subjects.ASSIGN_BUCKET, study_ttl_days * 86400, replicas)
    health = await open_bucket(nc, subjects.HEALTH_BUCKET, 0, replicas)
    return StudyBook(studies), Assignments(assign), Health(health)
