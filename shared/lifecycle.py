"""How a service process ends: SIGTERM (Kubernetes, the local actuator) or SIGINT (Ctrl-C) sets its stop event."""

from __future__ import annotations

import asyncio
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
