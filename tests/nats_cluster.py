"""A real 3-node JetStream cluster on free loopback ports, for the group and fault tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats

from dicomflow.natsserver import NatsServer, free_port
from shared.bus.jetstream import api


class NatsCluster:
    """``n`` nats-server processes routed to each other, each with JetStream."""

    def __init__(self, tmp: Path, n: int = 3, name: str = "dicomflow-test"):
        cports = [free_port() for _ in range(n)]
        self.servers = [
            NatsServer(tmp / f"cluster-n{i + 1}", free_port(), free_port(), name=f"n{i + 1}", cluster_port=cports[i],
                       routes=[p for j, p in enumerate(cports) if j != i], cluster_name=name,
                       log_file=tmp / f"cluster-n{i + 1}.log")
            for i in range(n)
        ]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        """All URLs, comma-separated (what ``nats.url`` and the workers take)."""
        return ",".join(self.urls)

    def start(self, timeout: float = 60.0) -> NatsCluster:
        """Start every node and wait until JetStream has a meta leader (the cluster accepts streams)."""
        for s in self.servers:
            s.start()
        asyncio.run(self._wait_ready(timeout))
        return self

    async def _wait_ready(self, timeout: float) -> None:
        nc = await nats.connect(servers=self.urls)
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                try:
                    info = await api(nc, "INFO", timeout=2)
                    if info.get("type", "").endswith("account_info_response"):
                        return
                except Exception:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError("the JetStream cluster did not elect a meta leader")
                await asyncio.sleep(0.25)
        finally:
            await nc.close()

    def by_name(self, name: str) -> NatsServer:
        return next(s for s in self.servers if s.name == name)

    def stream_leader(self, stream: str) -> str:
        """The name of the node leading ``stream`` now."""
        async def go() -> str:
            nc = await nats.connect(servers=[s.url for s in self.servers if s.alive()])
            try:
                info = await api(nc, f"STREAM.INFO.{stream}")
                return info["cluster"]["leader"]
            finally:
                await nc.close()
        return asyncio.run(go())

    def stop(self) -> None:
        for s in self.servers:
            s.kill()
