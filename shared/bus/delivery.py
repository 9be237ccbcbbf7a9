"""Typed deliveries: JetStream messages decoded once into their event model, with their consumer span.

Every consumer of dicomflow's streams decodes the same way, so it is done here, once per message:

- a message that decodes becomes a :class:`Delivery` (the event, the stream sequence, the delivery
  count, and a CONSUMER span that continues the producer's trace from the message headers);
- a message that does not decode is *poison*: retrying cannot fix it, so it is terminated
  (``msg.term()``: JetStream never redelivers it), logged at ERROR with its subject and stream
  sequence, and counted in ``dicomflow_bus_poison_messages_total{group=...}``. An operator finds
  it on the service's ``/metrics``, in its log ("poison message ... terminated"), and the message
  itself stays in the stream until its age limit: ``nats stream get <stream> <seq>`` shows it.

:class:`~shared.bus.consumer_group.PartitionedConsumer` uses :func:`decode` and :func:`finish`
around its batch handler; a plain pull consumer (the forwarder's) calls them itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from nats.aio.msg import Msg
from opentelemetry import trace
from prometheus_client import Counter
from pydantic import BaseModel, ValidationError

from shared.telemetry import extract_context

log = logging.getLogger("dicomflow.bus")

E = TypeVar("E", bound=BaseModel)

poison_messages = Counter("dicomflow_bus_poison_messages_total",
                          "Undecodable messages terminated (never redelivered), by consumer group", ["group"])


@dataclass(frozen=True, slots=True)
class Delivery(Generic[E]):
    """One decoded message: what a handler works on.

    ``span`` is started (a CONSUMER span whose parent is the producer's span) and ended by the
    consumer; the handler adds attributes to it and passes it to what it publishes.
    ``msg`` is there for its headers; acknowledging it is the consumer's business, not the handler's.
    """

    event: E
    subject: str
    stream_seq: int
    delivered: int
    span: trace.Span
    msg: Msg


# Handles one pull's deliveries (in partition order) and returns one outcome per delivery: None
# (acknowledge) or the exception that makes it retried.
DeliveryHandler = Callable[[list[Delivery]], Awaitable[list[BaseException | None]]]


def _sequence_and_count(msg: Msg) -> tuple[int, int]:
    """(stream sequence, delivery count) from the ack subject; (0, 1) for a message without one."""
    try:
        md = msg.metadata
        return md.sequence.stream, md.num_delivered
    except Exception:
        return 0, 1


async def decode(msgs: list[Msg], model: type[E], group: str, tracer: trace.Tracer, span_name: str
                 ) -> list[Delivery[E]]:
    """The deliveries of the messages that decode as ``model``, in order; poison ones are terminated.

    Each delivery's span is started here (``span_name``, continuing the trace in the headers) and
    must be ended with :func:`finish`.
    """
    out: list[Delivery[E]] = []
    for msg in msgs:
        seq, delivered = _sequence_and_count(msg)
        try:
            event = model.model_validate_json(msg.data)
        except ValidationError as exc:
            await park_poison(msg, group, seq, exc)
            continue
        span = tracer.start_span(span_name, context=extract_context(msg.headers), kind=trace.SpanKind.CONSUMER)
        out.append(Delivery(event, msg.subject, seq, delivered, span, msg))
    return out


async def park_poison(msg: Msg, group: str, seq: int, exc: Exception) -> None:
    """Terminate an undecodable message so it is never redelivered; log and count it."""
    log.error("%s: poison message on %s (stream seq %d) terminated, never redelivered: %s", group, msg.subject,
              seq, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    poison_messages.labels(group).inc()
    with contextlib.suppress(Exception):  # a lost term means one more delivery, parked again
        await msg.term()


def finish(deliveries: list[Delivery], outcomes: list[BaseException | None]) -> None:
    """End each delivery's span, marked as an error where its outcome is one."""
    for d, outcome in zip(deliveries, outcomes, strict=True):
        if outcome is not None:
            d.span.set_status(trace.Status(trace.StatusCode.ERROR, str(outcome)))
        d.span.end()


class InProgress:
    """Sends in-progress acks for ``msgs`` every ``interval`` seconds until cancelled, so a consumer's ack wait
    can stay short (what a killed holder's messages wait before redelivery) while one handling runs longer
    (a timer, not a task: cheap). Usable as a context manager."""

    def __init__(self, msgs: list[Msg], interval: float):
        self.msgs = msgs
        self.interval = interval
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(interval, self._fire)

    def _fire(self) -> None:
        self._loop.create_task(self._send())
        self._timer = self._loop.call_later(self.interval, self._fire)

    async def _send(self) -> None:
        for msg in self.msgs:
            with contextlib.suppress(Exception):
                await msg.in_progress()

    def cancel(self) -> None:
        """Stop sending."""
        self._timer.cancel()

    def __enter__(self) -> InProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()
