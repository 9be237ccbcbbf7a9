"""A real syslog audit repository on loopback: Debian's rsyslogd with rsyslog-gnutls, receiving RFC 5425 (syslog
over TLS, octet-counted frames) from clients with a certificate of a throwaway CA, writing each message to a file.

Started in the foreground (``rsyslogd -n``) by the test and killed by it; certificates made with ``cryptography``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dicomflow.natsserver import free_port

# One received message per line: how rsyslog parsed it (RFC 5424 fields), then the message as sent.
_TEMPLATE = "%protocol-version%|%syslogfacility%|%syslogseverity%|%app-name%|%procid%|%msgid%|%rawmsg%\\n"


@dataclass
class Certs:
    """PEM files of a throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed none of them


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert, cn: str, usage, sans: list[x509.GeneralName]):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def make_certs(folder: Path) -> Certs:
    """A CA, a server certificate (localhost, 127.0.0.1) and a client certificate, as PEM files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("dicomflow test CA")
    _, other = _ca("some other CA")
    s_key, s_cert = _leaf(ca_key, ca_cert, "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                          [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    c_key, c_cert = _leaf(ca_key, ca_cert, "dicomflow-node", ExtendedKeyUsageOID.CLIENT_AUTH,
                          [x509.DNSName("dicomflow-node")])
    certs = Certs(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
                  folder / "client.key", folder / "other-ca.pem")
    certs.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.other_ca.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    certs.server_cert.write_bytes(s_cert.public_bytes(serialization.Encoding.PEM))
    certs.client_cert.write_bytes(c_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(s_key, certs.server_key)
    _write_key(c_key, certs.client_key)
    return certs


class Rsyslog:
    """rsyslogd in the foreground: TLS listener on a free loopback port (client certificates of the CA required),
    every message appended to ``out``."""

    def __init__(self, folder: Path, certs: Certs):
        self.folder = folder
        self.certs = certs
        self.port = free_port()
        self.out = folder / "received.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Rsyslog:
        rsyslogd = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
        assert os.path.exists(rsyslogd), "rsyslogd is missing: run `make debs-test` (rsyslog rsyslog-gnutls)"
        work = self.folder / "work"
        work.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "rsyslog.conf"
        c = self.certs
        conf.write_text(f'''
global(maxMessageSize="256k" workDirectory="{work}"
       DefaultNetstreamDriver="gtls" DefaultNetstreamDriverCAFile="{c.ca}"
       DefaultNetstreamDriverCertFile="{c.server_cert}" DefaultNetstreamDriverKeyFile="{c.server_key}")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid")
input(type="imtcp" address="127.0.0.1" port="{self.port}")
template(name="audit" type="string" string="{_TEMPLATE}")
action(type="omfile" file="{self.out}" template="audit" flushOnTXEnd="on" asyncWriting="off")
''')
        check = subprocess.run([rsyslogd, "-N1", "-f", str(conf)], capture_output=True, text=True)
        assert check.returncode == 0, f"rsyslog configuration refused: {check.stderr}{check.stdout}"
        self.log = open(self.folder / "rsyslogd.log", "ab")
        self.proc = subprocess.Popen([rsyslogd, "-n", "-f", str(conf), "-i", str(self.folder / "rsyslogd.pid")],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        import socket

        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.folder / "rsyslogd.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError("rsyslogd did not listen in 20 s")

    def lines(self) -> list[str]:
        """The messages received so far (one line each; see the template)."""
        return self.out.read_text(errors="replace").splitlines() if self.out.exists() else []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()
