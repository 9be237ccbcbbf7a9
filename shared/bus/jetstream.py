"""The JetStream API calls dicomflow makes as raw requests: pull consumers in a ``pinned_client``
priority group (ADR-42), which nats-py 2.16's pull subscriptions do not speak (no ``group`` or pin id
on a pull), and the stream and consumer administration beside them, so that one module owns every
field we set (subject transform included) and checks what the server holds against it.

The pinned group is the server-side guarantee that two workers never consume one partition at
once, even while their views of the membership differ. Shapes are those measured in the notes:
pulls carry ``group`` and, once pinned, the ``Nats-Pin-Id`` the server gave us; 423 means our pin
is stale, 408 that the request expired (or someone else holds the pin).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

PRIORITY_GROUP = "owner"
NS = 1_000_000_000


class JetStreamAPIError(Exception):
    """An error answer from the JetStream API."""

    def __init__(self, code: int, err_code: int, description: str):
        super().__init__(f"{code} (err {err_code}): {description}")
        self.code = code
        self.err_code = err_code
        self.description = description


async def api(nc: NATS, subject: str, body: dict | None = None, timeout: float = 5.0) -> dict:
    """Send one JetStream API request and return the decoded answer, raising on an error answer."""
    payload = json.dumps(body).encode() if body is not None else b""
    resp = await nc.request(f"$JS.API.{subject}", payload, timeout=timeout)
    data = json.loads(resp.data or b"{}")
    err = data.get("error")
    if err:
        raise JetStreamAPIError(err.get("code", 0), err.get("err_code", 0), err.get("description", ""))
    return data


# Answers a clustered JetStream gives while a meta leader or stream leader is being elected, or
# while a loaded 2-core node falls behind: the request is safe to repeat, so set-up calls wait.
# (err_code 10008: "JetStream system temporarily unavailable", 10009: "cluster can not handle
# request", i.e. no meta leader yet.) "JetStream not enabled" is also a 503 but never goes away.
TRANSIENT_API_ERRORS = {10008, 10009}


async def admin_api(nc: NATS, subject: str, body: dict | None = None, deadline_s: float = 60.0,
                    timeout: float = 5.0) -> dict:
    """:func:`api` for idempotent set-up calls: repeat on timeouts and on transient cluster answers.

    Start-up of a member must not fail because the cluster elected a leader at that moment;
    only an answer that will not change (a real error) or the deadline ends the retries.
    """
    end = time.monotonic() + deadline_s
    delay = 0.2
    while True:
        try:
            return await api(nc, subject, body, timeout=timeout)
        except JetStreamAPIError as exc:
            if exc.err_code not in TRANSIENT_API_ERRORS or time.monotonic() + delay > end:
                raise
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            if time.monotonic() + delay > end:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def ensure_stream(nc: NATS, config: dict, fixed: tuple[str, ...] = ()) -> dict:
    """Create the stream, or update it to ``config``; refuse to change the fields named in ``fixed``.

    Idempotent: every service calls it at start-up.
    """
    name = config["name"]
    try:
        info = await admin_api(nc, f"STREAM.INFO.{name}")
    except JetStreamAPIError as exc:
        if exc.err_code != 10059:  # stream not found
            raise
        try:
            return await admin_api(nc, f"STREAM.CREATE.{name}", config)
        except JetStreamAPIError as exc2:
            if exc2.err_code != 10058:  # created concurrently by another service
                raise
            info = await admin_api(nc, f"STREAM.INFO.{name}")
    current = info["config"]
    for key in fixed:
        if current.get(key) != config.get(key):
            raise RuntimeError(
                f"stream {name}: {key} is {current.get(key)!r} on the server but {config.get(key)!r} in the "
                f"configuration; changing it would remap in-flight studies (a maintenance operation)"
            )
    wanted = {k: v for k, v in config.items() if current.get(k) != v}
    if not wanted:
        return info
    return await admin_api(nc, f"STREAM.UPDATE.{name}", {**current, **config})


def pinned_consumer_config(durable: str, filter_subject: str, ack_wait_s: float, pinned_timeout_s: float,
                           max_ack_pending: int) -> dict:
    """Config of one partition's durable pull consumer in the pinned priority group."""
    return {
        "durable_name": durable,
        "deliver_policy": "all",
        "ack_policy": "explicit",
        "ack_wait": int(ack_wait_s * NS),
        "max_deliver": -1,
        "filter_subject": filter_subject,
        "replay_policy": "instant",
        "max_waiting": 512,
        "max_ack_pending": max_ack_pending,
        "priority_groups": [PRIORITY_GROUP],
        "priority_policy": "pinned_client",
        "priority_timeout": int(pinned_timeout_s * NS),
    }


async def ensure_consumer(nc: NATS, stream: str, config: dict) -> dict:
    """Create or update a durable consumer (idempotent)."""
    durable = config["durable_name"]
    return await admin_api(nc, f"CONSUMER.CREATE.{stream}.{durable}", {"stream_name": stream, "config": config})


async def consumer_info(nc: NATS, stream: str, durable: str) -> dict:
    """CONSUMER.INFO of one durable."""
    return await api(nc, f"CONSUMER.INFO.{stream}.{durable}")


async def reading_consumer(nc: NATS, stream: str, start_seq: int = 0, start_time: str = "",
                           inactive_s: float = 30.0) -> str:
    """An ephemeral consumer that acknowledges nothing, from a sequence or an RFC 3339 time (reading changes
    nothing; the server removes it ``inactive_s`` after its last use, or :func:`delete_consumer` at once)."""
    config: dict = {"ack_policy": "none", "replay_policy": "instant", "inactive_threshold": int(inactive_s * NS),
                    "mem_storage": True, "num_replicas": 1}
    if start_time:
        config.update(deliver_policy="by_start_time", opt_start_time=start_time)
    else:
        config.update(deliver_policy="by_start_sequence", opt_start_seq=max(start_seq, 1))
    return (await api(nc, f"CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": config}))["name"]


async def delete_consumer(nc: NATS, stream: str, name: str) -> None:
    """Remove a consumer (one already gone is no error)."""
    try:
        await api(nc, f"CONSUMER.DELETE.{stream}.{name}")
    except JetStreamAPIError as exc:
        if exc.err_code != 10014:  # consumer not found
            raise


async def read_batch(nc: NATS, stream: str, consumer: str, batch: int, timeout: float = 5.0) -> list[Msg]:
    """Up to ``batch`` messages of a :func:`reading_consumer`, in one pull that does not wait for more than there
    are (``no_wait``). They arrive on one inbox into a list: nats-py's ``fetch`` makes a task and a timer per
    message, which made reading a feed page of 200 cost about 1 ms a message."""
    got: list[Msg] = []
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        if _status(msg):
            if _status(msg) != "100":  # not a heartbeat: 404/408, no more messages for this pull
                done.set()
            return
        got.append(msg)
        if len(got) >= batch:
            done.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_msg)
    try:
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
                         json.dumps({"batch": batch, "no_wait": True}).encode(), reply=inbox)
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await sub.unsubscribe()
    return got


async def unpin(nc: NATS, stream: str, durable: str) -> None:
    """Release the pin so the next owner is pinned at once instead of after PinnedTTL."""
    await api(nc, f"CONSUMER.UNPIN.{stream}.{durable}", {"group": PRIORITY_GROUP})


@dataclass
class PullResult:
    """What one pinned pull returned."""

    messages: list[Msg] = field(default_factory=list)
    status: str = ""  # "", "404", "408", "409", "423", "400"
    description: str = ""


class PinnedPuller:
    """Pulls one durable consumer in the pinned group, remembering the pin id the server gave us.

    One pull request is kept outstanding at a time; :meth:`fetch` returns as soon as messages are
    there (it does not wait for a full batch), so a lone instance is handled at once.
    """

    def __init__(self, nc: NATS, stream: str, durable: str):
        self.nc = nc
        self.stream = stream
        self.durable = durable
        self.pin_id: str | None = None
        self._inbox = nc.new_inbox()
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub = None
        self._active_until = 0.0
        self._outstanding = 0

    async def _ensure_sub(self) -> None:
        if self._sub is None:
            async def on_msg(msg: Msg) -> None:
                self._queue.put_nowait(msg)

            self._sub = await self.nc.subscribe(self._inbox, cb=on_msg)

    async def _request(self, batch: int, expires_s: float) -> None:
        req: dict = {"batch": batch, "expires": int(expires_s * NS), "group": PRIORITY_GROUP}
        if self.pin_id:
            req["id"] = self.pin_id
        await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}",
                              json.dumps(req).encode(), reply=self._inbox)
        self._active_until = time.monotonic() + expires_s
        self._outstanding = batch

    def _take(self, msg: Msg, result: PullResult) -> bool:
        """Account one arrival; return False when it ended the request."""
        status = _status(msg)
        if status:
            if status == "100":  # idle heartbeat
                return True
            result.status = status
            result.description = (msg.headers or {}).get("Description", "")
            if status == "423":
                self.pin_id = None
            self._outstanding = 0
            return False
        pin = (msg.headers or {}).get("Nats-Pin-Id")
        if pin:
            self.pin_id = pin
        result.messages.append(msg)
        self._outstanding -= 1
        return self._outstanding > 0

    async def fetch(self, batch: int, expires_s: float, linger_s: float = 0.0) -> PullResult:
        """Return the messages available now, waiting at most ``expires_s`` for the first one.

        ``linger_s``: after the first message, wait up to this long for the batch to fill. A consumer
        that keeps up with a slow producer otherwise handles one message per pull, paying a batch's
        fixed costs (index commit, fsync, publish round trips) for each.
        """
        await self._ensure_sub()
        result = PullResult()
        now = time.monotonic()
        if self._outstanding <= 0 or now >= self._active_until + 0.5:
            if self._queue.empty():
                await self._request(batch, expires_s)
        wait = max(0.05, self._active_until + 0.5 - time.monotonic())
        try:
            first = await asyncio.wait_for(self._queue.get(), wait)
        except TimeoutError:
            self._outstanding = 0
            result.status = "timeout"
            return result
        more = self._take(first, result)
        deadline = time.monotonic() + linger_s
        while more:  # everything already here, then what arrives within the linger while the batch is short
            if not self._queue.empty():
                more = self._take(self._queue.get_nowait(), result)
                continue
            left = deadline - time.monotonic()
            if left <= 0 or len(result.messages) >= batch:
                break
            try:
                msg = await asyncio.wait_for(self._queue.get(), left)
            except TimeoutError:
                break
            more = self._take(msg, result)
        return result

    async def keep_pin(self, expires_s: float) -> None:
        """Keep our pin while the caller is busy with what it fetched.

        The server unpins a client that has not pulled for PinnedTTL (priority_timeout), and would
        then deliver the partition to another member while we are still handling our batch: two
        members on one partition. A small pull (batch 1) proves we are alive; what it delivers waits
        in our queue and is handled after the batch, in order.
        """
        if self.pin_id is None or self._sub is None:
            return
        req = {"batch": 1, "expires": int(expires_s * NS), "group": PRIORITY_GROUP, "id": self.pin_id}
        await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}",
                              json.dumps(req).encode(), reply=self._inbox)
        self._active_until = max(self._active_until, time.monotonic() + expires_s)
        self._outstanding = max(self._outstanding, 0) + 1

    async def close(self) -> list[Msg]:
        """Drop the inbox subscription; return the messages delivered to us but never fetched.

        The caller naks them so the next owner gets them at once rather than after ack_wait.
        """
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error:
                pass
            self._sub = None
        left: list[Msg] = []
        while not self._queue.empty():
            msg = self._queue.get_nowait()
            if not _status(msg):
                left.append(msg)
        return left


def _status(msg: Msg) -> str:
    """The status code of a JetStream control message ("" for a real message)."""
    return (msg.headers or {}).get("Status", "") if not msg.data else ""
