"""The association threads' JetStream publisher, against a real nats-server."""

from __future__ import annotations

import contextlib
import threading

import nats
import pytest

from services.ingest.publisher import PublishError, ThreadPublisher
from shared.loopthread import LoopThread


@pytest.fixture
def publisher(nats_server):
    loop = LoopThread("test-publisher")
    nc = loop.call(nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2), timeout=10)
    js = nc.jetstream()
    loop.call(js.add_stream(name="PUBTEST", subjects=["pub.>"], duplicate_window=60), timeout=10)
    pub = ThreadPublisher(nc, loop.loop)
    loop.call(pub.start(), timeout=10)
    yield pub, js, loop
    with contextlib.suppress(Exception):  # the timeout test killed the server: pending bytes cannot be flushed
        loop.call(nc.close(), timeout=10)
    loop.stop()


def test_each_thread_gets_its_own_pubAck_and_duplicates_are_stored_once(publisher):
    pub, js, loop = publisher
    acks: dict[int, dict] = {}

    def send(t: int) -> None:
        for i in range(50):
            acks[t * 100 + i] = pub.publish(f"pub.t{t}.{i}", f"{t}:{i}".encode(), {"Nats-Msg-Id": f"m{t}-{i}"}, 5)

    threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert len(acks) == 200
    assert sorted(a["seq"] for a in acks.values()) == list(range(1, 201)), "one stored message per publish"
    again = pub.publish("pub.t0.0", b"0:0", {"Nats-Msg-Id": "m0-0"}, 5)
    assert again.get("duplicate") is True and again["seq"] == acks[0]["seq"]
    info = loop.call(js.stream_info("PUBTEST"), timeout=10)
    assert info.state.messages == 200
    # The bytes and headers arrive as published.
    msg = loop.call(js.get_msg("PUBTEST", acks[301]["seq"]), timeout=10)
    assert msg.subject == "pub.t3.1" and msg.data == b"3:1" and msg.headers["Nats-Msg-Id"] == "m3-1"


def test_a_subject_no_stream_serves_is_an_error_not_a_success(publisher):
    pub, _, _ = publisher
    with pytest.raises(PublishError, match="no stream"):
        pub.publish("nostream.x", b"x", {"Nats-Msg-Id": "x"}, 5)


def test_no_pubAck_in_time_raises_timeout(publisher, nats_server):
    pub, _, _ = publisher
    nats_server.kill()  # the publish is buffered for a reconnect that does not come in time
    with pytest.raises(TimeoutError):
        pub.publish("pub.late.1", b"x", {"Nats-Msg-Id": "late"}, 1.0)
