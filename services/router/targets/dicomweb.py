"""DICOMweb targets: STOW-RS (PS3.18 10.5), one multipart/related POST per batch, streamed from the files."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator

from shared.config import DicomwebTargetConfig
from shared.storage.reading import CHUNK

from .base import Batch, SendError, Target


class DicomwebTarget(Target[DicomwebTargetConfig]):
    """A STOW-RS endpoint: every instance of a batch in one POST to ``url/studies``."""

    kind = "dicomweb"

    def send(self, batch: Batch) -> None:
        target = self.config
        boundary = f"dicomflow-{uuid.uuid4().hex}"
        req = urllib.request.Request(target.url.rstrip("/") + "/studies", data=_body(batch, boundary), method="POST",
                                     headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                                              f"boundary={boundary}",
                                              "Accept": "application/dicom+json", **target.headers})
        # Where urllib puts the length of a bytes body (before Host): the request is the same as one built in memory,
        # and sent with a Content-Length rather than chunked, which some STOW-RS servers refuse.
        req.add_unredirected_header("Content-length", str(_body_length(batch, boundary)))
        try:
            # verified, as urllib does by default: against the target's own CA where it names one
            context = ssl.create_default_context(cafile=target.tls_ca) if target.tls_ca else None
            with urllib.request.urlopen(req, timeout=target.timeout_s, context=context) as resp:
                if resp.status not in (200, 202):
                    raise SendError(f"STOW-RS answered HTTP {resp.status}")
                # 202 means some instances failed (PS3.18 10.5.3): retry the batch.
                if resp.status == 202:
                    raise SendError("STOW-RS answered 202: some instances were not stored")
        except urllib.error.HTTPError as exc:
            raise SendError(f"STOW-RS answered HTTP {exc.code}: {exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise SendError(f"STOW-RS request failed: {exc}") from exc

    def probe_address(self) -> tuple[str, int]:
        parsed = urllib.parse.urlsplit(self.config.url)
        return parsed.hostname or "127.0.0.1", parsed.port or (443 if parsed.scheme == "https" else 80)

    def check(self) -> str | None:
        return None  # urllib is part of Python: nothing to be missing


def _head(boundary: str) -> bytes:
    return f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()


def _tail(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode()


def _body_length(batch: Batch, boundary: str) -> int:
    """The multipart body's length in bytes, from the files' sizes."""
    return sum(len(_head(boundary)) + path.stat().st_size + 2 for _, path in batch) + len(_tail(boundary))


def _parts(batch: Batch, boundary: str) -> Iterator[bytes]:
    for _, path in batch:
        yield _head(boundary)
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
        yield b"\r\n"
    yield _tail(boundary)


def _body(batch: Batch, boundary: str) -> Iterator[bytes]:
    """The multipart/related body, read from the files as the request is sent, in pieces of about ``CHUNK``
    bytes: a small batch goes in one write as before (not its boundaries apart, each a small segment that
    Nagle's algorithm could hold back for a delayed ack)."""
    pending = bytearray()
    for part in _parts(batch, boundary):
        pending += part
        if len(pending) >= CHUNK:
            yield bytes(pending)
            pending.clear()
    if pending:
        yield bytes(pending)
