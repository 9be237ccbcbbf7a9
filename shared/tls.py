"""TLS for the servers dicomflow runs (the DICOM SCP, the DICOMweb service) and the associations it opens (C-MOVE
destinations): contexts and peer identities.

TLS 1.2 or later, the configured certificate and key; with a client CA, every client must present a
certificate that chains to it (``CERT_REQUIRED``): the certificate's common name is then who the peer is,
bound to an AE title and its tenant by :func:`shared.tenancy.certificate_may_act_as`.
"""

from __future__ import annotations

import ssl


def server_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """A server context: ``cert``/``key`` (PEM), TLS 1.2+, client certificates required and verified against
    ``client_ca`` when it is given (not asked for otherwise)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: str = "", cert: str = "", key: str = "", check_hostname: bool = True) -> ssl.SSLContext:
    """A client context for an association dicomflow opens (a C-MOVE destination): TLS 1.2+, the peer's
    certificate verified against ``ca`` (the system's CAs when empty), its host name unless told not to; our own
    ``cert``/``key`` presented when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def common_name(peer_cert: dict | None) -> str | None:
    """The subject common name of a verified peer certificate (``SSLSocket.getpeercert()``), None without one."""
    for rdn in (peer_cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None
