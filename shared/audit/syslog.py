"""Audit records to a syslog audit repository: RFC 5424 messages framed per RFC 5425, over TLS (IHE ATNA).

:func:`syslog_message` and :func:`frame` are plain functions (tested without I/O); :class:`SyslogSender`
is the thin socket shell the audit trail's thread calls. Severity follows the outcome as audit repositories
expect (success notice, minor failure warning, serious error, major critical), facility 10 (authpriv), and
MSGID ``IHE+RFC-3881`` as ATNA's Audit Record Repository recognises DICOM audit messages by it.
"""

from __future__ import annotations

import socket
import ssl
from datetime import datetime

from shared.config import SyslogConfig

FACILITY_AUTHPRIV = 10
SEVERITY = {"success": 5, "minor-failure": 4, "serious-failure": 3, "major-failure": 2}
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"


def _header_field(value: str, limit: int) -> str:
    """A header field of RFC 5424: printable US-ASCII without spaces, at most ``limit`` characters, "-" if empty."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def syslog_message(xml: bytes, outcome: str, timestamp: datetime, hostname: str, app_name: str, procid: str) -> bytes:
    """One RFC 5424 SYSLOG-MSG: header, no structured data, the audit message XML as a UTF-8 MSG (with its BOM)."""
    pri = FACILITY_AUTHPRIV * 8 + SEVERITY.get(outcome, 4)
    stamp = timestamp.isoformat(timespec="microseconds").replace("+00:00", "Z")
    header = (f"<{pri}>1 {stamp} {_header_field(hostname, 255)} {_header_field(app_name, 48)} "
              f"{_header_field(procid, 128)} {MSGID} -")
    return header.encode("ascii") + b" " + BOM + xml


def frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


def tls_context(cfg: SyslogConfig) -> ssl.SSLContext:
    """Client TLS of the syslog link: TLS 1.2 or later, the server's certificate verified against ``cfg.ca``
    (or the system's CAs) and its name; our certificate where the repository asks for one (mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert:
        ctx.load_cert_chain(cfg.cert, cfg.key or None)
    return ctx


class SyslogSender:
    """One TLS connection to the audit repository, opened on first use and again after a failure."""

    def __init__(self, cfg: SyslogConfig):
        self.cfg = cfg
        self._ctx = tls_context(cfg)
        self._sock: ssl.SSLSocket | None = None

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.cfg.host, self.cfg.port), timeout=self.cfg.timeout_s)
        try:
            return self._ctx.wrap_socket(raw, server_hostname=self.cfg.server_name or self.cfg.host)
        except BaseException:
            raw.close()
            raise

    def send(self, framed: bytes) -> None:
        """Send one framed message; on a broken connection reconnect once and resend. Raises OSError otherwise."""
        for attempt in (1, 2):
            try:
                if self._sock is None:
                    self._sock = self._connect()
                self._sock.sendall(framed)
                return
            except OSError:
                self.close()
                if attempt == 2:
                    raise

    def close(self) -> None:
        """Close the connection (the next send opens a new one)."""
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
