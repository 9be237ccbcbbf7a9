"""Who this process is to NATS and how the link is protected: TLS contexts, credentials, refusals.

One place turns ``nats.*`` settings into what both clients need: nats-py's connect options
(:func:`client_options`) and the fields of a CONNECT the blocking socket publisher writes itself
(:func:`connect_fields`, the nonce signed for nkeys and creds files). A refusal (credentials not
accepted, a server certificate not trusted, a client certificate missing) is a configuration error:
:func:`refusal` names the setting to fix, and the services stop at start-up with it instead of
retrying forever (or, in the ingest, answering 0xA700 to every C-STORE).
"""

from __future__ import annotations

import base64
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shared.config import NatsConfig


class Refused(Exception):
    """NATS refused this process (credentials, TLS): no retry helps; the message names the setting to fix."""


# Texts of the server's -ERR for a CONNECT it refused (nats-server's auth errors).
_AUTH_ERRORS = ("authorization violation", "authentication timeout", "authentication expired",
                "user authentication revoked", "account authentication expired")


def uses_tls(nats: NatsConfig, urls: list[str]) -> bool:
    """Whether this process must speak TLS to NATS: a CA or client certificate is configured, or a tls:// URL."""
    return bool(nats.tls_ca or nats.tls_cert) or any(urlsplit(u).scheme == "tls" for u in urls)


def tls_context(nats: NatsConfig) -> ssl.SSLContext:
    """A client context that verifies the server's certificate and name (against ``nats.tls_ca``, else the
    system's CAs), TLS 1.2 or later, presenting ``nats.tls_cert`` where the server verifies clients."""
    ctx = ssl.create_default_context(cafile=nats.tls_ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if nats.tls_cert:
        ctx.load_cert_chain(nats.tls_cert, nats.tls_key or None)
    return ctx


def client_options(nats: NatsConfig, urls: list[str]) -> dict[str, Any]:
    """nats-py ``connect`` options for TLS and credentials (only those that are set)."""
    opts: dict[str, Any] = {}
    if uses_tls(nats, urls):
        opts["tls"] = tls_context(nats)
    if nats.user:
        opts["user"], opts["password"] = nats.user, nats.password
    elif nats.token:
        opts["token"] = nats.token
    elif nats.nkey_seed_file:
        opts["nkeys_seed"] = nats.nkey_seed_file
    elif nats.creds_file:
        opts["user_credentials"] = nats.creds_file
    return opts


def _sign(seed: bytes, nonce: str) -> str:
    import nkeys  # the nats-py[nkeys] extra; imported only where nkeys or creds files are configured

    kp = nkeys.from_seed(bytearray(seed.strip()))
    try:
        return base64.b64encode(kp.sign(nonce.encode())).decode()
    finally:
        kp.wipe()


def _creds_parts(path: str) -> tuple[str, bytes]:
    """The user JWT and nkey seed of a creds file (the two armoured blocks ``nsc`` writes)."""
    lines = Path(path).read_text().splitlines()

    def block(marker: str) -> str:
        for i, line in enumerate(lines):
            if marker in line and i + 1 < len(lines):
                return lines[i + 1].strip()
        raise ValueError(f"{path}: no {marker} block")

    return block("BEGIN NATS USER JWT"), block("BEGIN USER NKEY SEED").encode()


def connect_fields(nats: NatsConfig, info: dict[str, Any], url_auth: dict[str, str]) -> dict[str, str]:
    """The credential fields of a CONNECT to a server that sent ``info`` (its nonce signed where nkeys are used).

    ``url_auth``: user and password, or token, given in the URL itself (used when no setting gives any).
    """
    if nats.user:
        return {"user": nats.user, "pass": nats.password}
    if nats.token:
        return {"auth_token": nats.token}
    if nats.nkey_seed_file:
        import nkeys

        seed = Path(nats.nkey_seed_file).read_bytes()
        kp = nkeys.from_seed(bytearray(seed.strip()))
        public = kp.public_key.decode()
        kp.wipe()
        return {"nkey": public, "sig": _sign(seed, info.get("nonce", ""))}
    if nats.creds_file:
        jwt, seed = _creds_parts(nats.creds_file)
        return {"jwt": jwt, "sig": _sign(seed, info.get("nonce", ""))}
    return dict(url_auth)


def credential_setting(nats: NatsConfig) -> str:
    """The setting that holds this process's NATS credentials, for messages."""
    if nats.user:
        return f"nats.user ({nats.user!r}) / nats.password"
    for name in ("token", "nkey_seed_file", "creds_file"):
        if getattr(nats, name):
            return f"nats.{name}"
    return "nats.user / nats.password, nats.token, nats.nkey_seed_file or nats.creds_file (none is set)"


def refusal(exc: BaseException, nats: NatsConfig, url: str = "") -> Refused | None:
    """The :class:`Refused` that ``exc`` (raised while connecting) amounts to; None for an outage (retry)."""
    where = f"NATS{f' at {url}' if url else ''}"
    text = str(exc).lower()
    if any(marker in text for marker in _AUTH_ERRORS):
        return Refused(f"{where} refused this process's credentials ({str(exc).strip()}): check "
                       f"{credential_setting(nats)} (DICOMFLOW__NATS__...)")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Refused(f"{where}: the server's TLS certificate is not trusted ({exc.verify_message}): check "
                       f"nats.tls_ca ({nats.tls_ca or 'unset: the system CAs'}) and that the URL's host name is "
                       f"in the certificate")
    if isinstance(exc, ssl.SSLError):
        hint = ("the server may require a client certificate: set nats.tls_cert and nats.tls_key"
                if not nats.tls_cert else "check nats.tls_cert / nats.tls_key and the server's CA for clients")
        return Refused(f"{where}: TLS handshake failed ({exc.reason or exc}): {hint}")
    if "tls_required" in text or "secure connection" in text:
        return Refused(f"{where} requires TLS: set nats.tls_ca (or a tls:// URL)")
    return None
