"""Set-up calls survive a cluster that is electing a leader: transient answers and timeouts are
repeated, real errors are not (a real nats-server carries the requests)."""

import asyncio
import json

import nats
import pytest

from shared.bus.jetstream import JetStreamAPIError, admin_api
from tests.helpers import start_nats

SUBJECT = "$JS.API.DICOMFLOW.TEST"


def _run(server_url: str, answers: list[dict | None], deadline_s: float = 10.0):
    """Answer the first requests with ``answers`` (None = stay silent), then with success."""

    async def go():
        nc = await nats.connect(server_url)
        seen = []

        async def responder(msg):
            seen.append(msg.data)
            answer = answers[len(seen) - 1] if len(seen) <= len(answers) else {"ok": True}
            if answer is not None:
                await msg.respond(json.dumps(answer).encode())

        await nc.subscribe(SUBJECT, cb=responder)
        await nc.flush()
        try:
            return await admin_api(nc, "DICOMFLOW.TEST", {"x": 1}, deadline_s=deadline_s, timeout=0.5), seen
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.fixture
def server(tmp_path):
    s = start_nats(tmp_path)
    yield s
    s.kill()


def test_transient_answers_and_timeouts_are_repeated(server):
    unavailable = {"error": {"code": 503, "err_code": 10008, "description": "JetStream system temporarily unavailable"}}
    no_leader = {"error": {"code": 500, "err_code": 10009, "description": "JetStream cluster can not handle request"}}
    result, seen = _run(server.url, [unavailable, None, no_leader])
    assert result == {"ok": True}
    assert len(seen) == 4 and all(json.loads(b) == {"x": 1} for b in seen)


def test_a_real_error_is_not_repeated(server):
    not_enabled = {"error": {"code": 503, "err_code": 10039, "description": "jetstream not enabled for account"}}
    with pytest.raises(JetStreamAPIError) as exc:
        _run(server.url, [not_enabled])
    assert exc.value.err_code == 10039


def test_the_deadline_ends_the_retries(server):
    with pytest.raises(nats.errors.TimeoutError):
        _run(server.url, [None] * 100, deadline_s=2.0)


def test_cancel_and_wait_ends_a_loop_that_swallowed_a_cancel():
    """What Python 3.11's wait_for does when a reply and a cancel meet: the loop must still end."""
    from shared.lifecycle import cancel_and_wait

    async def go():
        swallowed = []

        async def loop():
            while True:
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    if not swallowed:  # the first cancel is lost, as in the race
                        swallowed.append(True)
                        continue
                    raise

        task = asyncio.create_task(loop())
        await asyncio.sleep(0.1)
        await asyncio.wait_for(cancel_and_wait(task, None), 10)
        return task.cancelled(), swallowed

    cancelled, swallowed = asyncio.run(go())
    assert cancelled and swallowed == [True]
