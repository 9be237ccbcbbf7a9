"""Publishing events to JetStream: one way, in a blocking and an async flavour.

Every publish takes an :class:`~shared.contract.events.Event` (it knows its subject and its
``Nats-Msg-Id``), sends its JSON with ``Nats-Msg-Id``, ``Content-Type`` and the W3C trace context,
and returns the PubAck; no PubAck (a timeout, no stream, an error answer) raises, so a caller never
reports success for an event JetStream did not store. A stored duplicate (same ``Nats-Msg-Id``
within the stream's window) is a success.

- :class:`Publisher`: blocking callers (the ingest's association threads);
  :func:`shared.bus.publish_blocking.blocking_publisher` picks the implementation.
- :class:`AsyncPublisher`: coroutines on the service's event loop (store, router).
"""

from __future__ import annotations

import json
from typing import Protocol

from nats.js import JetStreamContext
from nats.js.api import PubAck
from opentelemetry import propagate, trace

from shared.contract.events import Event


class PublishError(Exception):
    """JetStream did not store the message (an error PubAck, or nobody serves the subject)."""


class Publisher(Protocol):
    """Blocks the calling thread until JetStream acknowledged the event; safe from any number of threads."""

    def publish(self, event: Event, msg_id: str | None = None) -> PubAck:
        """Publish ``event`` with the calling thread's trace context; raises unless it was stored.

        ``msg_id`` replaces the event's own id where one event is deliberately published again.
        """
        ...

    def close(self) -> None:
        """Release the publisher's connections (the process's NATS connection is not closed)."""
        ...


def event_headers(msg_id: str, span: trace.Span | None = None) -> dict[str, str]:
    """Headers of an event: de-duplication id, content type and the trace context of ``span`` (or the current one).

    One dict per publish, filled in place: this runs on the path every received instance waits for.
    """
    headers = {"Nats-Msg-Id": msg_id, "Content-Type": "application/json"}
    propagate.inject(headers, context=trace.set_span_in_context(span) if span is not None else None)
    return headers


def parse_pub_ack(subject: str, status: str, data: bytes) -> PubAck:
    """The PubAck of a publish on ``subject``; raises PublishError where JetStream did not store it.

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
    return PubAck(stream=ack.get("stream", ""), seq=ack.get("seq", 0), domain=ack.get("domain"),
                  duplicate=ack.get("duplicate"))


class AsyncPublisher:
    """Publishes events from coroutines through nats-py's JetStream context."""

    def __init__(self, js: JetStreamContext, timeout: float):
        self.js = js
        self.timeout = timeout

    async def publish(self, event: Event, msg_id: str | None = None, span: trace.Span | None = None) -> PubAck:
        """Publish ``event`` and return its PubAck; raises on timeout, no responders or an error answer.

        ``span``: the span the event continues, where it is not the current one (a batch handles many
        messages, each with its own span, in one task).
        """
        headers = event_headers(msg_id or event.msg_id(), span)
        return await self.js.publish(event.subject(), event.model_dump_json().encode(), timeout=self.timeout,
                                     headers=headers)
