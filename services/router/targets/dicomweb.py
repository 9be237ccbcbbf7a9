"""DICOMweb targets: STOW-RS (PS3.18 10.5), one multipart/related POST per batch."""

from __future__ import annotations

import io
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid

from shared.config import DicomwebTargetConfig
from shared.dicom.part10 import part10

from .base import Batch, SendError, Target


class DicomwebTarget(Target[DicomwebTargetConfig]):
    """A STOW-RS endpoint: every instance of a batch in one POST to ``url/studies``."""

    kind = "dicomweb"

    def send(self, batch: Batch) -> None:
        target = self.config
        boundary = f"dicomflow-{uuid.uuid4().hex}"
        body = io.BytesIO()
        for job, data in batch:
            body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            body.write(part10(data, job.sop_class_uid, job.sop_uid, job.transfer_syntax_uid))
            body.write(b"\r\n")
        body.write(f"--{boundary}--\r\n".encode())
        req = urllib.request.Request(target.url.rstrip("/") + "/studies", data=body.getvalue(), method="POST", headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json", **target.headers})
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
