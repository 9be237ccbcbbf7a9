"""Connecting to NATS, declaring the streams, and a one-call event publish for coroutines."""

from __future__ import annotations

import asyncio
import logging

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import PubAck

from shared.bus.jetstream import ensure_stream
from shared.bus.nats_auth import Refused, client_options, refusal
from shared.bus.publish import AsyncPublisher
from shared.config import Config
from shared.contract import subjects
from shared.contract.events import Event

log = logging.getLogger("dicomflow.bus")


async def connect(config: Config, name: str, **kwargs) -> NATS:
    """A NATS connection that reconnects forever (a service outlives NATS restarts), over TLS and with this
    process's credentials where the configuration gives them (:mod:`shared.bus.nats_auth`).

    A server that refuses the credentials or the TLS handshake before the first connection raises
    :class:`~shared.bus.nats_auth.Refused` naming the setting to fix: retrying would never help, and a
    service that waited forever would look like one waiting for NATS to start. A disconnect is a warning
    only when the server went away: our own close (every short-lived command ends with one) closes the
    client before nats-py reports the disconnect.
    """
    client: list[NATS] = []
    caller_error_cb = kwargs.pop("error_cb", None)

    async def on_error(exc: Exception) -> None:
        if not client:  # still connecting: a refusal ends the attempt (raised out of nats-py's connect loop)
            refused = refusal(exc, config.nats, ", ".join(config.nats_servers()))
            if refused is not None:
                raise refused
        if caller_error_cb is not None:
            await caller_error_cb(exc)
            return
        log.warning("nats: %s", exc)

    async def on_disconnect() -> None:
        if not (client and client[0].is_closed):
            log.warning("nats: disconnected")

    async def on_reconnect() -> None:
        log.info("nats: reconnected")

    opts = dict(servers=config.nats_servers(), name=name, connect_timeout=config.nats.connect_timeout_s,
                max_reconnect_attempts=-1, reconnect_time_wait=0.5, allow_reconnect=True,
                error_cb=on_error, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
                pending_size=64 * 1024 * 1024, **client_options(config.nats, config.nats_servers()))
    opts.update(kwargs)
    nc = NATS()
    try:
        await nc.connect(**opts)
    except Refused:
        await _abandon(nc)
        raise
    except (OSError, nats.errors.Error) as exc:  # a refusal nats-py raised itself (no reconnects allowed)
        refused = refusal(exc, config.nats, ", ".join(config.nats_servers()))
        if refused is None:
            raise
        await _abandon(nc)
        raise refused from exc
    client.append(nc)
    return nc


async def _abandon(nc: NATS) -> None:
    """Close a client whose first connection was refused (nats-py leaves its transport half set up)."""
    # close() waits for tasks a refused first connection never started (it hung after a failed TLS handshake):
    # only the transport holds anything.
    try:
        if nc._transport is not None:
            nc._transport.close()
            await asyncio.sleep(0)  # let the loop close the socket now, not when it is gone
    except Exception:  # noqa: BLE001 - nothing of it is used any more
        pass


class Unreachable(ConnectionError):
    """No NATS server of the configuration answered (a short-lived command reports it and exits)."""


async def connect_once(config: Config, name: str) -> NATS:
    """A connection for a short-lived command: one attempt per server, no reconnects, bounded in time.

    nats-py retries a refused server forever when ``max_reconnect_attempts`` is 0 (only values above
    0 discard a server), which made ``dicomflow status`` hang while NATS was down.
    """
    async def quiet(_exc: Exception) -> None:  # the one failure is raised and reported by the caller
        pass

    servers = config.nats_servers()
    try:
        return await asyncio.wait_for(
            connect(config, name, max_reconnect_attempts=1, allow_reconnect=False, error_cb=quiet),
            timeout=config.nats.connect_timeout_s * (len(servers) + 1) + 1)
    except Refused as exc:
        raise Unreachable(str(exc)) from exc
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise Unreachable(f"cannot reach NATS at {', '.join(servers)} ({type(exc).__name__})") from exc


def check_credentials(config: Config) -> None:
    """Connect to NATS once with this process's TLS and credentials (blocking; for supervisors before they start
    their children); raises :class:`~shared.bus.nats_auth.Refused` when the server refuses them. An
    unreachable server passes: the children wait for it."""
    async def probe() -> None:
        nc = await connect_once(config, "dicomflow-credentials-check")
        await nc.close()

    try:
        asyncio.run(probe())
    except Unreachable as exc:
        if isinstance(exc.__cause__, Refused):
            raise exc.__cause__ from None
        log.warning("%s: starting anyway (the services wait for it)", exc)


async def ensure_streams(nc: NATS, config: Config) -> None:
    """Declare the instance stream, the events stream and the change feed it fills (idempotent; every service
    calls it)."""
    await ensure_stream(nc, subjects.instance_stream_config(config.stream), fixed=("subject_transform",))
    await ensure_stream(nc, subjects.events_stream_config(config.stream))
    await ensure_stream(nc, subjects.changes_stream_config(config.stream, config.changefeed.max_age_days))


async def publish_event(js: JetStreamContext, event: Event, timeout: float, msg_id: str | None = None) -> PubAck:
    """Publish one event with :class:`~shared.bus.publish.AsyncPublisher` (its ``Nats-Msg-Id`` and the
    current trace context); returns the PubAck, raises on timeout or no responders.

    ``msg_id`` replaces the event's own id where one event is deliberately published again (a replay).
    """
    return await AsyncPublisher(js, timeout).publish(event, msg_id=msg_id)
