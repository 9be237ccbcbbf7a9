"""An intake with what it needs to run: a NATS connection on its own loop thread, the blocking publisher, the
staging backend. Opened the same way by the DICOM receiver and by STOW-RS."""

from __future__ import annotations

import functools
import logging

from services.ingest.intake import Intake
from services.ingest.loopthread import LoopThread
from shared.bus.connection import connect, ensure_streams
from shared.bus.publish_blocking import blocking_publisher
from shared.config import Config
from shared.storage.objectstore import Backends
from shared.tenancy import tenant_of_instance

log = logging.getLogger("dicomflow.ingest")


class ConnectedIntake:
    """``intake`` with its NATS connection (``nc``), publisher and ``backends``; :meth:`close` releases them."""

    def __init__(self, config: Config, client_name: str, loop_name: str = "ingest-nats"):
        self.loop = LoopThread(loop_name)
        try:
            self.nc = self.loop.call(connect(config, client_name), timeout=config.nats.connect_timeout_s + 5)
            self.loop.call(ensure_streams(self.nc, config), timeout=30)
        except BaseException:
            self.loop.stop()
            raise
        self.publisher = blocking_publisher(config, client_name, self.nc, self.loop.loop)
        self.backends = Backends(config)
        staging = self.backends.get(config.storage.staging)
        staging.prepare_writer()  # before the first instance: killed writers' leftovers gone, log segments made
        self.intake = Intake(staging, self.publisher, config.ingest.max_instance_bytes,
                             config.ingest.stream_above_bytes,
                             tenant_of=functools.partial(tenant_of_instance, config.access),
                             strict_uids=config.ingest.strict_uids)

    def close(self) -> None:
        """Drain the NATS connection (a dead NATS does not keep the caller from going on), close the rest."""
        try:
            self.loop.call(self.nc.drain(), timeout=10)
        except Exception as exc:  # noqa: BLE001
            log.warning("nats drain: %s", exc)
        self.publisher.close()
        self.backends.close()
        self.loop.stop()
