"""Recording stored instances in the catalogue: concurrent batches share one transaction (group commit)."""

from __future__ import annotations

import asyncio

from shared.catalogue.entry import CatalogueEntry
from shared.catalogue.sql import Recorded, SqlCatalogue

__all__ = ["GroupCommit", "Recorded"]


class GroupCommit:
    """Batches catalogue records from concurrent handlers into one transaction per round.

    Handlers of different partitions arrive together; while one transaction commits (fsync), the
    next ones queue and go in the following transaction. Each caller still returns only after its
    own rows are durable, so the ack-after-durable rule holds; one writer per process also means no
    lock waits between its own batches.
    """

    def __init__(self, catalogue: SqlCatalogue, max_batch: int = 512):
        self.catalogue = catalogue
        self.max_batch = max_batch
        self._pending: list[tuple[CatalogueEntry, asyncio.Future]] = []
        self._running = False

    async def record_many(self, entries: list[CatalogueEntry]) -> list[Recorded]:
        """Record entries; returns their outcomes once all are committed."""
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in entries]
        self._pending.extend(zip(entries, futs, strict=True))
        if not self._running:
            self._running = True
            asyncio.create_task(self._drain())
        return list(await asyncio.gather(*futs))

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
                try:
                    results = await asyncio.to_thread(self.catalogue.record_batch, [e for e, _ in batch])
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), result in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self._running = False
