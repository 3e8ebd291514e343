"""deploy/nginx/livegate.conf made runnable in a temporary directory, as root or not: a
throwaway self-signed certificate instead of /etc/nginx/tls/, the upstream names pointed at
127.0.0.1 (nginx resolves them when it loads the file), the listener moved to a free loopback
port, and pid, logs and temp files inside the directory. nginx is installed from Debian on
demand (:func:`support.debian.require_program`)."""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .debian import require_program
from .ports import free_port

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "nginx" / "livegate.conf"


def self_signed(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A throwaway ECDSA P-256 certificate for ``name`` and its key (PEM, valid for a day):
    ``directory/fullchain.pem`` and ``directory/privkey.pem``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class NginxSetup:
    """``conf_text`` (livegate.conf by default) and a main nginx.conf that includes it, in
    ``tmp``. ``upstream_port`` replaces the upstream servers' ports too (a test gateway's
    plain port). ``port`` is where nginx listens (TLS), ``cert`` the certificate it serves."""

    def __init__(self, tmp: Path, conf_text: str | None = None, upstream_port: int | None = None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.cert, _ = self_signed(tmp / "tls")
        text = (NGINX_CONF.read_text() if conf_text is None else conf_text).replace("/etc/nginx/tls/", f"{tmp / 'tls'}/")
        port = r"\g<2>" if upstream_port is None else f":{upstream_port}"
        text = re.sub(r"(?m)^(\s*server\s+)[A-Za-z0-9.-]+(:\d+)", rf"\g<1>127.0.0.1{port}", text)
        text, listens = re.subn(r"(?m)^(\s*listen\s+)443\b", rf"\g<1>127.0.0.1:{self.port}", text)
        assert listens, "no `listen 443` in the nginx config"
        (tmp / "livegate.conf").write_text(text)
        temp = "\n".join(f"    {k}_temp_path {tmp}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # One process (no master, no worker user to switch to), in the foreground.
        (tmp / "nginx.conf").write_text(f"""
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
master_process off;
daemon off;
events {{}}
http {{
    access_log {tmp}/access.log;
{temp}
    include {tmp}/livegate.conf;
}}
""")
        self.exe = require_program("nginx", "nginx")

    def command(self, *extra: str) -> list[str]:
        return [self.exe, "-p", f"{self.tmp}/", "-c", str(self.tmp / "nginx.conf"), "-e", str(self.tmp / "error.log"), *extra]

    def test_config(self) -> subprocess.CompletedProcess[str]:
        """``nginx -t`` (it binds the listener too, hence the free port)."""
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=60, check=False)

    def log(self) -> str:
        path = self.tmp / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""
