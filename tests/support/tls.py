"""Throw-away TLS material for tests, made with the `openssl` CLI: a CA and a server certificate it signs.

The server certificate is for 127.0.0.1 (IP SAN) and localhost (DNS SAN), so clients that check the host
name (redis-py does by default) accept it when they trust the CA. Keys are RSA 2048 (fast to make,
accepted by every OpenSSL security level); certificates are valid for two days.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one CA and one server certificate signed by it."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise FileNotFoundError("`openssl` not found; it is needed to make test certificates")
    done = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")


def make_ca(directory: Path, name: str = "actmap test CA") -> tuple[Path, Path]:
    """A self-signed CA in ``directory``; returns (certificate, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = name.replace(" ", "-")
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(key), "-out", str(cert),
        cwd=directory,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


def make_tls_files(directory: Path) -> TlsFiles:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it, all in ``directory``."""
    ca_cert, ca_key = make_ca(directory)
    server_key, csr, server_cert = (
        directory / "server.key",
        directory / "server.csr",
        directory / "server.crt",
    )
    extensions = directory / "server.ext"
    extensions.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-subj", "/CN=127.0.0.1",
        "-keyout", str(server_key), "-out", str(csr),
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "2", "-sha256", "-extfile", str(extensions), "-out", str(server_cert),
        cwd=directory,
    )  # fmt: skip
    server_key.chmod(0o600)
    return TlsFiles(ca_cert=ca_cert, ca_key=ca_key, server_cert=server_cert, server_key=server_key)
