"""The blocking JetStream publishers (sockets, and the event-loop fallback), against a real nats-server."""

from __future__ import annotations

import contextlib
import threading

import nats
import pytest
from nats.js.api import PubAck
from opentelemetry.sdk.trace import TracerProvider

from services.ingest.loopthread import LoopThread
from shared.bus.publish import PublishError
from shared.bus.publish_blocking import LoopPublisher, SocketPublisher, Unsupported
from shared.contract.events import InstanceReceived, InstanceTags, utcnow


@pytest.fixture(params=["sync", "loop"])
def publisher(request, nats_server):
    loop = LoopThread("test-publisher")
    nc = loop.call(nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2), timeout=10)
    js = nc.jetstream()
    loop.call(js.add_stream(name="PUBTEST", subjects=["pub.>"], duplicate_window=60), timeout=10)
    if request.param == "sync":
        pub = SocketPublisher([nats_server.url], "test", 2.0, 5.0)
        pub.check()
    else:
        pub = LoopPublisher(nc, loop.loop, 5.0)
        loop.call(pub.start(), timeout=10)
    yield pub, js, loop
    pub.close()
    with contextlib.suppress(Exception):  # the timeout test killed the server: pending bytes cannot be flushed
        loop.call(nc.close(), timeout=10)
    loop.stop()


def test_each_thread_gets_its_own_pubAck_and_duplicates_are_stored_once(publisher):
    pub, js, loop = publisher
    acks: dict[int, PubAck] = {}

    def send(t: int) -> None:
        for i in range(50):
            headers = {"Nats-Msg-Id": f"m{t}-{i}", "traceparent": f"00-{t:032x}-{i + 1:016x}-01"}
            acks[t * 100 + i] = pub.send(f"pub.t{t}.{i}", f"{t}:{i}".encode(), headers, 5)

    threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert len(acks) == 200
    assert sorted(a.seq for a in acks.values()) == list(range(1, 201)), "one stored message per publish"
    again = pub.send("pub.t0.0", b"0:0", {"Nats-Msg-Id": "m0-0"}, 5)
    assert again.duplicate is True and again.seq == acks[0].seq
    info = loop.call(js.stream_info("PUBTEST"), timeout=10)
    assert info.state.messages == 200
    # The bytes and headers arrive as published.
    msg = loop.call(js.get_msg("PUBTEST", acks[301].seq), timeout=10)
    assert msg.subject == "pub.t3.1" and msg.data == b"3:1"
    assert msg.headers["Nats-Msg-Id"] == "m3-1" and msg.headers["traceparent"] == f"00-{3:032x}-{2:016x}-01"


def test_an_event_goes_to_its_subject_with_its_msg_id_content_type_and_the_callers_trace(publisher):
    pub, js, loop = publisher
    loop.call(js.add_stream(name="INTEST", subjects=["dicom.in.>"], duplicate_window=60), timeout=10)
    tags = InstanceTags(study_uid="1.2.3", series_uid="1.2.3.1", sop_uid="1.2.3.1.7")
    event = InstanceReceived(tags=tags, transfer_syntax_uid="1.2.840.10008.1.2.1", digest="ab" * 32, size=10,
                             backend="local", calling_ae="MOD", called_ae="DICOMFLOW", received_at=utcnow())
    with TracerProvider().get_tracer("test").start_as_current_span("caller") as span:
        ack = pub.publish(event)
    assert ack.stream == "INTEST" and not ack.duplicate
    assert pub.publish(event).duplicate is True, "the event's own msg_id de-duplicates a second publish"
    msg = loop.call(js.get_msg("INTEST", ack.seq), timeout=10)
    assert msg.subject == event.subject() and InstanceReceived.model_validate_json(msg.data) == event
    assert msg.headers["Nats-Msg-Id"] == event.msg_id() and msg.headers["Content-Type"] == "application/json"
    ctx = span.get_span_context()
    assert msg.headers["traceparent"].startswith(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")


def test_a_subject_no_stream_serves_is_an_error_not_a_success(publisher):
    pub, _, _ = publisher
    with pytest.raises(PublishError, match="no stream"):
        pub.send("nostream.x", b"x", {"Nats-Msg-Id": "x"}, 5)
    assert pub.send("pub.after.1", b"x", {"Nats-Msg-Id": "after"}, 5).seq == 1, "the publisher still works"


def test_no_pubAck_in_time_raises_timeout_or_connection_error(publisher, nats_server):
    pub, _, _ = publisher
    nats_server.kill()
    with pytest.raises((TimeoutError, ConnectionError)):
        pub.send("pub.late.1", b"x", {"Nats-Msg-Id": "late"}, 1.0)


def test_socket_publisher_reconnects_after_a_server_restart(nats_server):
    """A pooled connection the server dropped is replaced; the publish after the restart succeeds."""
    loop = LoopThread("test-publisher")
    nc = loop.call(nats.connect(nats_server.url), timeout=10)
    loop.call(nc.jetstream().add_stream(name="PUBTEST", subjects=["pub.>"]), timeout=10)
    loop.call(nc.close(), timeout=10)
    loop.stop()
    pub = SocketPublisher([nats_server.url], "test", 2.0, 5.0)
    assert pub.send("pub.a.1", b"1", {"Nats-Msg-Id": "1"}, 5).seq == 1
    nats_server.stop()
    nats_server.start()  # same port, same JetStream store
    assert pub.send("pub.a.2", b"2", {"Nats-Msg-Id": "2"}, 5).seq == 2
    pub.close()


def test_socket_publisher_fails_over_to_the_next_server(tmp_path, nats_server):
    """The first URL refuses connections: the pool connects to the next one."""
    from dicomflow.natsserver import free_port

    dead = f"nats://127.0.0.1:{free_port()}"
    loop = LoopThread("test-publisher")
    nc = loop.call(nats.connect(nats_server.url), timeout=10)
    loop.call(nc.jetstream().add_stream(name="PUBTEST", subjects=["pub.>"]), timeout=10)
    loop.call(nc.close(), timeout=10)
    loop.stop()
    pub = SocketPublisher([dead, nats_server.url], "test", 2.0, 5.0)
    assert pub.send("pub.b.1", b"1", {"Nats-Msg-Id": "b1"}, 5).seq == 1
    pub.close()


def test_socket_publisher_refuses_websocket_urls_so_the_loop_publisher_takes_over():
    """What the sockets do not speak (ws://) is refused at construction: blocking_publisher then picks the loop.
    TLS and credentials they do speak (tests/test_nats_security.py)."""
    with pytest.raises(Unsupported):
        SocketPublisher(["ws://nats.example:8080"], "test", 1.0, 1.0)
