"""Short-lived commands and NATS: a clear, quick failure when it is unreachable, and no warning of our own close."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time

from dicomflow.natsserver import free_port
from shared.bus.connection import connect, ensure_streams
from shared.config import load_config
from tests.helpers import REPO, start_nats


def _cli(tmp_path, url: str, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "DICOMFLOW__NATS__URL": url, "DICOMFLOW_DATA_DIR": str(tmp_path / "data")}
    return subprocess.run([sys.executable, "-m", "dicomflow", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def test_status_without_nats_says_so_and_exits_at_once(tmp_path):
    url = f"nats://127.0.0.1:{free_port()}"  # nobody listens there
    for args in (("status",), ("dlq", "list")):
        t0 = time.monotonic()
        res = _cli(tmp_path, url, *args)
        assert res.returncode != 0
        assert time.monotonic() - t0 < 15, "the command kept retrying"
        assert f"cannot reach NATS at {url}" in res.stderr, res.stderr
        assert "Connect call failed" not in res.stderr, "one line, not a log of every attempt"


def test_status_ends_without_a_disconnect_warning(tmp_path):
    server = start_nats(tmp_path)
    config = load_config(None, environ={"DICOMFLOW__NATS__URL": server.url})

    async def declare() -> None:
        nc = await connect(config, "test-declare")
        await ensure_streams(nc, config)
        await nc.close()

    try:
        asyncio.run(declare())
        res = _cli(tmp_path, server.url, "status")
        assert res.returncode == 0, res.stderr
        assert "disconnected" not in res.stderr, res.stderr
    finally:
        server.stop()


def test_a_real_loss_of_the_server_is_still_a_warning(tmp_path, caplog):
    server = start_nats(tmp_path)
    config = load_config(None, environ={"DICOMFLOW__NATS__URL": server.url})

    async def go() -> None:
        nc = await connect(config, "test-loss")
        server.kill()
        for _ in range(100):
            if not nc.is_connected:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        await nc.close()

    try:
        with caplog.at_level(logging.WARNING, logger="dicomflow.bus"):
            asyncio.run(go())
    finally:
        server.stop()
    assert any("disconnected" in r.getMessage() for r in caplog.records)
