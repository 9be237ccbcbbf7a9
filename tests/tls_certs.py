"""Throwaway certificates for the TLS tests: one CA, a server certificate for localhost/127.0.0.1, client
certificates whose common name is an AE title (or a service), and a second CA nobody trusts."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Pair:
    cert: Path
    key: Path


def _key():
    # RSA: dcmtk's default TLS profile (BCP 195) offers only RSA-authenticated cipher suites for TLS 1.2
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write(path: Path, cert: x509.Certificate, key) -> Pair:
    path.parent.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return Pair(cert_path, key_path)


class CA:
    """A certificate authority that signs server and client certificates into ``folder``."""

    def __init__(self, folder: Path, name: str = "dicomflow test CA"):
        self.folder = folder
        self.key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pair = _write(folder / name.replace(" ", "-"), self.cert, self.key)

    @property
    def path(self) -> Path:
        return self.pair.cert

    def _issue(self, name: str, usage, sans: list[x509.GeneralName]) -> Pair:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return _write(self.folder / name, builder.sign(self.key, hashes.SHA256()), key)

    def server(self, name: str = "server") -> Pair:
        """A server certificate for localhost and 127.0.0.1."""
        return self._issue(name, ExtendedKeyUsageOID.SERVER_AUTH,
                           [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])

    def client(self, common_name: str) -> Pair:
        """A client certificate whose subject's common name is ``common_name`` (an AE title, a service)."""
        return self._issue(common_name, ExtendedKeyUsageOID.CLIENT_AUTH, [])
