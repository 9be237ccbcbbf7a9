"""The DICOMweb service in a thread of the test process, on a free port, over a given configuration."""

from __future__ import annotations

import asyncio
import threading

from dicomflow.natsserver import free_port
from dicomflow.web import serve
from shared.config import Config


class WebService:
    """``with WebService(config) as web: web.url``: the service runs until the block ends."""

    def __init__(self, config: Config):
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{config.web.path_prefix}"
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="web-under-test", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main():
            self._stop = asyncio.Event()
            ready = asyncio.Event()
            task = asyncio.create_task(serve(self.config, port=self.port, metrics_port=0, stop=self._stop,
                                             ready=ready))
            waiter = asyncio.create_task(ready.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            self._ready.set()
            await task
        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001 - surfaced by __enter__
            self._error = exc
            self._ready.set()

    def __enter__(self) -> WebService:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
