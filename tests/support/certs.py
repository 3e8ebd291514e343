"""A throw-away PKI made at test time: a root CA, an intermediate, and server certificates
for ``localhost`` / ``127.0.0.1`` issued by the intermediate, written as PEM files. The
chain file holds leaf + intermediate, as a public CA delivers a "full chain"; clients
trust the root only, so a test passes only if the gateway serves the whole chain.

Nothing here is secret or committed: every run makes new keys.

Tools without a certificate generator of their own (the Node SDK tests, ``tools/autobahn.sh
--tls``) run it from ``tests/``: ``python -m support.certs DIR`` makes the CA in ``DIR``,
issues ``server.pem``/``server.key`` and prints ``{"root", "cert", "key"}`` (file paths) as
one JSON line.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _key(kind: str) -> _PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "livegate tests")])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Issued:
    """A server certificate on disk."""

    cert_file: Path
    key_file: Path
    serial: int
    not_after: dt.datetime


class TestCA:
    """Root and intermediate CA in ``directory``; :meth:`issue` makes server certificates."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        self._root_key = _key("ec")
        self.root = self._ca_cert(_name("livegate test root"), self._root_key, _name("livegate test root"), self._root_key, now, path_len=1)
        self._int_key = _key("ec")
        self.intermediate = self._ca_cert(_name("livegate test intermediate"), self._int_key, self.root.subject, self._root_key, now, path_len=0)
        self.root_file = self.dir / "root-ca.pem"
        self.root_file.write_bytes(_pem(self.root))
        self._n = 0

    @staticmethod
    def _ca_cert(subject: x509.Name, key: _PrivateKey, issuer: x509.Name, signer: _PrivateKey, now: dt.datetime, path_len: int) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(signer, hashes.SHA256())
        )

    def issue(self, name: str = "server", *, key: str = "ec", days: float = 30, not_before_days: float = -1, chain: bool = True) -> Issued:
        """A certificate for localhost/127.0.0.1/::1 valid from ``not_before_days`` to
        ``days`` from now (negative ``days``: already expired), written to
        ``<name>.pem`` (leaf + intermediate unless ``chain`` is false) and ``<name>.key``."""
        self._n += 1
        now = dt.datetime.now(dt.UTC)
        leaf_key = _key(key)
        serial = x509.random_serial_number()
        not_after = now + dt.timedelta(days=days)
        san = x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ])
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"localhost ({name})"))
            .issuer_name(self.intermediate.subject)
            .public_key(leaf_key.public_key())
            .serial_number(serial)
            .not_valid_before(now + dt.timedelta(days=not_before_days))
            .not_valid_after(not_after)
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._int_key, hashes.SHA256())
        )
        cert_file = self.dir / f"{name}.pem"
        key_file = self.dir / f"{name}.key"
        cert_file.write_bytes(_pem(cert) + (_pem(self.intermediate) if chain else b""))
        key_file.write_bytes(
            leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        key_file.chmod(0o600)
        return Issued(cert_file, key_file, serial, not_after)

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting the root only (hostname checked)."""
        ctx = ssl.create_default_context(cafile=str(self.root_file))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


def peer_serial(sock: ssl.SSLSocket | ssl.SSLObject) -> int:
    """Serial number of the certificate a TLS peer presented."""
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def main(argv: list[str]) -> int:
    """``python -m support.certs DIR``: a CA in DIR and a server certificate; prints the
    paths as JSON."""
    if len(argv) != 1:
        print("usage: python -m support.certs DIR  (from tests/)", file=sys.stderr)
        return 2
    ca = TestCA(Path(argv[0]))
    leaf = ca.issue("server")
    print(json.dumps({"root": str(ca.root_file), "cert": str(leaf.cert_file), "key": str(leaf.key_file)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
