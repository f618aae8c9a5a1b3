"""A vCenter's self-signed certificate, and thumbprints the way vSphere shows them.

The thumbprint is the SHA-256 of the certificate's DER bytes, printed as
colon-separated upper-case hex (``AB:CD:...``); ``normalize`` accepts it with
or without colons and in any case.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from testbed.errors import InputError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def make_self_signed(cert_path: Path, key_path: Path, common_name: str, dns_names: list[str],
                     ip: str) -> None:
    """Write a new EC P-256 key and a self-signed certificate for ``common_name`` (valid 10 years)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Testbed vCenter")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([*(x509.DNSName(d) for d in dns_names),
                                       x509.IPAddress(ipaddress.ip_address(ip))])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def thumbprint_der(der: bytes) -> str:
    h = hashlib.sha256(der).hexdigest().upper()
    return ":".join(h[i:i + 2] for i in range(0, 64, 2))


def thumbprint_pem(pem: str | bytes) -> str:
    text = pem.decode() if isinstance(pem, bytes) else pem
    return thumbprint_der(ssl.PEM_cert_to_DER_cert(text))


def thumbprint_file(path: Path) -> str:
    return thumbprint_pem(path.read_text())


def normalize(thumbprint: str) -> str:
    """'ab:cd:..' / 'ABCD..' -> 'AB:CD:..'; InputError when it is not a SHA-256 thumbprint."""
    h = thumbprint.replace(":", "").strip().lower()
    if not _HEX64.match(h):
        raise InputError(f"{thumbprint!r} is not a SHA-256 certificate thumbprint",
                         hint="give 64 hex digits, with or without colons "
                              "(`testbed vcenter show NAME` prints a vCenter's thumbprint)")
    return ":".join(h[i:i + 2] for i in range(0, 64, 2)).upper()


# --- peer signatures: a vCenter proves who it is to a peer that trusts its certificate ---------

def sign(key_path: Path, message: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def verify(cert_pem: str, message: bytes, signature: bytes) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    pub = cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        return False
    try:
        pub.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
