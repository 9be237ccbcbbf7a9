"""How a service process ends: SIGTERM (Kubernetes, the local actuator) or SIGINT (Ctrl-C) sets its stop event."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import signal


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGTERM/SIGINT; then the service leaves gracefully (drain, ack, unpin).

    Outside the main thread (a service embedded in a test or benchmark) signals cannot be bound; the
    caller's own ``stop`` event ends it there.
    """
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass


async def cancel_and_wait(*tasks: asyncio.Task | None) -> None:
    """Cancel background tasks and wait until they have ended, cancelling again while they have not.

    Once is not enough: Python 3.11's ``wait_for`` (inside nats-py's requests and KV watchers) returns
    the result and drops a cancel that lands as the result arrives, and a ``while True`` loop then runs
    on while the caller waits for it (a stop hang seen in the tests).
    """
    pending = {t for t in tasks if t is not None and not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    for task in tasks:  # retrieve outcomes, so asyncio does not warn that nobody did
        if task is not None and not task.cancelled():
            task.exception()


def settle_after_startup(young_threshold: int = 20_000) -> None:
    """Once a service is up: keep its start-up objects out of the cyclic collector, and collect less often.

    Imports, config and clients make a long-lived heap that every full collection would walk again;
    per-instance work allocates many short-lived objects, so the default first-generation threshold
    (700) ran a collection every few instances (measured: about 5% of the store's CPU). Reference
    counting still frees almost everything at once; cycles wait a little longer.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, older, oldest)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def tune_allocator(keep_bytes: int = 256 << 20, mmap_above: int = 8 << 20, arenas: int = 1) -> bool:
    """Let glibc keep freed memory for reuse instead of returning it, before the service starts threads.

    A service moving 512 KiB objects allocates and frees them (Python bytes, librados' copies) from
    several threads: glibc's per-thread arenas and heap trimming gave the pages back and the next
    object faulted them in again, zeroed (measured in the store: 16 page faults per object, and
    zeroing pages was a tenth of its CPU; 6 faults with these settings). One arena, no trimming below
    ``keep_bytes``, and no mmap below ``mmap_above``. Returns False where the C library is not glibc
    or refuses a setting (the settings before it stay applied).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = all(mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, arenas), (_M_TRIM_THRESHOLD, keep_bytes), (_M_MMAP_THRESHOLD, mmap_above)))
    if not ok:
        logging.getLogger("dicomflow").debug("mallopt refused a setting; allocator left as it was")
    return ok

