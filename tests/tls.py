"""Throw-away certificates for transport tests, made with the openssl command line (no new dependency).

    ca = make_ca(tmp_path / "ca")                       # ca.crt, ca.key
    cert, key = make_cert(ca, tmp_path / "srv", "srv")  # CN and SAN 127.0.0.1 / localhost, signed by ca
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr[-2000:]}")


@dataclass(frozen=True)
class Ca:
    cert: Path
    key: Path


def make_ca(directory: Path, name: str = "wildfire-test-ca") -> Ca:
    directory.mkdir(parents=True, exist_ok=True)
    ca = Ca(directory / "ca.crt", directory / "ca.key")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", str(ca.key), "-out", str(ca.cert))
    return ca


def make_cert(ca: Ca, directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost (usable by a server or a client), signed by ``ca``."""
    directory.mkdir(parents=True, exist_ok=True)
    key, csr, cert, ext = (directory / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
             "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return cert, key
