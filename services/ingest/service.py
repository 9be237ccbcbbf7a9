"""The ingest process: NATS connection, staging backend, SCP; and the supervisor of several of them."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading

from services.ingest.commitment import Committer
from services.ingest.connected import ConnectedIntake
from services.ingest.find import Finder
from services.ingest.retrieve import Retriever
from services.ingest.scp import listening_socket, start_scp
from shared.audit import trail as audit
from shared.bus.connection import check_credentials
from shared.catalogue.open import open_catalogue
from shared.config import Config
from shared.lifecycle import settle_after_startup
from shared.supervisor import ChildSpec, Supervisor
from shared.telemetry import add_health_check, setup_tracing, start_metrics
from shared.tenancy import certificate_may_act_as
from shared.tls import server_context

log = logging.getLogger("dicomflow.ingest")


def serve(config: Config, metrics_port: int | None = None, stop: threading.Event | None = None,
          listen_fd: int | None = None) -> None:
    """Run one receiver process until SIGTERM/SIGINT (or ``stop`` is set).

    ``listen_fd``: the listening socket inherited from :func:`supervise` (lean engine), instead of binding.
    """
    setup_tracing("ingest", config.telemetry)
    start_metrics(config.telemetry, metrics_port)
    audit.install(config, "ingest")
    connected = ConnectedIntake(config, f"dicomflow-ingest-{os.getpid()}")
    intake, backends = connected.intake, connected.backends
    ing = config.ingest
    args = (intake, ing.host, ing.port, ing.ae_title, ing.max_pdu, ing.max_associations, ing.network_timeout_s,
            allowed_calling_aes(config))
    # The one AE answers C-FIND too, from the shared catalogue (each receiver its own connections, opened
    # at its first C-FIND: a catalogue database that is down keeps no receiver from storing).
    finder = Finder(functools.partial(open_catalogue, config.catalogue.url, config.data_path()), config.access,
                    ing.ae_title, config.web.max_results)
    # ... and C-GET and C-MOVE, reading the objects from their placements
    retriever = Retriever(finder, config.access, ing.move_destinations)
    # ... and storage commitment: an instance is committed once the catalogue has it in every placement of its policy
    committer = Committer(finder, config.access, {name: list(p.placements) for name, p in config.storage.policies.items()},
                          ing.move_destinations, ing.ae_title, ing.max_pdu, ing.network_timeout_s, ing.commitment_wait_s,
                          retriever.tls)
    # DICOM over TLS: only TLS connections; with a client CA, a verified certificate bound to the calling AE
    tls = server_context(ing.tls_cert, ing.tls_key, ing.tls_ca) if ing.tls_cert else None
    may_act_as = functools.partial(certificate_may_act_as, config.access)
    if ing.engine == "pynetdicom":
        from .scp_pynetdicom import start_scp as start_pynetdicom

        server = start_pynetdicom(*args, finder=finder, retriever=retriever, backends=backends,
                                  private_sop_classes=ing.private_sop_classes, artim_timeout=ing.artim_timeout_s,
                                  tls=tls, may_act_as=may_act_as, max_connections=ing.max_connections,
                                  committer=committer)
    else:
        server = start_scp(*args, listen_fd=listen_fd, finder=finder, retriever=retriever, backends=backends,
                           private_sop_classes=ing.private_sop_classes, artim_timeout=ing.artim_timeout_s,
                           max_connections=ing.max_connections, tls=tls, may_act_as=may_act_as, committer=committer)
    stop = stop or threading.Event()
    # Ready while connected and accepting associations; not ready from SIGTERM on, so the Service stops sending.
    add_health_check("nats", lambda: connected.nc.is_connected)
    add_health_check("scp_accepting", lambda: not stop.is_set())
    if threading.current_thread() is threading.main_thread():  # this process is the receiver
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        settle_after_startup()
    stop.wait()
    log.info("ingest stopping: no new associations, finishing open ones")
    server.stop(10)  # stops accepting; C-STOREs being handled are answered first
    committer.finish(ing.stop_drain_s() - 10)  # the reports still due go out (they read the catalogue: finder open)
    finder.close()
    connected.close()
    audit.close(2)


def allowed_calling_aes(config: Config) -> list[str]:
    """The calling AEs that may associate (empty: any): ingest.allowed_calling_aes, and where no default
    tenant takes unknown AEs, only those a tenant or a gateway names."""
    if config.ingest.allowed_calling_aes or config.access.default_tenant is not None:
        return config.ingest.allowed_calling_aes
    known = {ae for tenant in config.access.tenants.values() for ae in tenant.aes} | set(config.access.gateways)
    return sorted(known) or ["<no AE is configured for any tenant>"]


def supervise(config: Config, argv_base: list[str], metrics_port: int | None) -> int:
    """Run ``ingest.workers`` receiver processes sharing the port; restart any that dies (with backoff).

    With the lean engine the supervisor owns the listening socket and the receivers inherit it, so
    new associations go to idle receivers first and wait in the backlog while one restarts; the
    pynetdicom engine binds in each receiver with SO_REUSEPORT.
    """
    n = config.ingest.workers
    if n == 1:
        serve(config, metrics_port)
        return 0
    # Credentials or TLS that NATS refuses are a configuration error: found once here, before any receiver
    # starts (each would be refused and restarted forever), and raised to the command, which names the setting.
    check_credentials(config)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    listen = listening_socket(config.ingest.host, config.ingest.port) if config.ingest.engine == "lean" else None
    port = metrics_port if metrics_port is not None else config.telemetry.metrics_port
    supervisor = Supervisor(logger=log)
    for i in range(n):
        args = [*argv_base, "--single", *(["--metrics-port", str(port + i)] if port else [])]
        fds: tuple[int, ...] = ()
        if listen is not None:
            args += ["--listen-fd", str(listen.fileno())]
            fds = (listen.fileno(),)
        supervisor.start(ChildSpec(f"receiver-{i}", args, pass_fds=fds, stop_timeout_s=config.ingest.stop_drain_s() + 5))
    while not stopping.wait(supervisor.poll()):
        pass
    supervisor.stop()
    if listen is not None:
        listen.close()
    return 0


def self_command(*args: str) -> list[str]:
    """The command line that runs this dicomflow with ``args`` (used to spawn workers)."""
    return [sys.executable, "-m", "dicomflow", *args]
