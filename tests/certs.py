"""Test certificates made with ``cryptography``: a CA, server and client certificates it signs, an
expired one, and a second CA nobody trusts. Everything is written as PEM files into a directory.

    pki = make_pki(tmp_path / "pki")
    pki.ca, pki.server_cert, pki.server_key, pki.client_cert, pki.client_key, pki.rogue_cert ...
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


@dataclass
class Issued:
    cert: Path
    key: Path
    serial: int


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "RadBridge tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


class Authority:
    """A CA that signs server and client certificates."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(name)
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(NOW - DAY).not_valid_after(NOW + 365 * DAY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = directory / f"{name.lower().replace(' ', '-')}.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, cn: str, *, server: bool = True, client: bool = False,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> Issued:
        """A certificate for a server (SAN localhost, 127.0.0.1), a client, or with ``client`` both."""
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client or not server else [])
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.name)
                   .public_key(key.public_key()).serial_number(serial)
                   .not_valid_before(not_before or NOW - DAY).not_valid_after(not_after or NOW + 30 * DAY)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.directory / f"{stem}.crt", self.directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
        return Issued(cert_path, key_path, serial)


@dataclass
class PKI:
    directory: Path
    authority: Authority
    ca: Path  # the trusted CA's certificate
    server: Issued  # CN localhost, SAN localhost and 127.0.0.1
    client: Issued  # CN MODALITY1 (also a DICOM calling AE title)
    rogue_ca: Path  # a CA nobody trusts
    rogue_client: Issued  # signed by the rogue CA
    expired: Issued  # a server certificate of the trusted CA, expired yesterday


def make_pki(directory: Path) -> PKI:
    directory.mkdir(parents=True, exist_ok=True)
    ca = Authority(directory, "Test CA")
    rogue = Authority(directory, "Rogue CA")
    return PKI(directory=directory, authority=ca, ca=ca.path,
               server=ca.issue("server", "localhost"),
               client=ca.issue("client", "MODALITY1", server=False),
               rogue_ca=rogue.path, rogue_client=rogue.issue("rogue-client", "MODALITY1", server=False),
               expired=ca.issue("expired", "localhost", not_before=NOW - 30 * DAY, not_after=NOW - DAY))


def serial_of(pem: bytes | str) -> int:
    """The serial number of a PEM certificate (e.g. what openssl s_client -showcerts printed)."""
    data = pem.encode() if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificate(data).serial_number
