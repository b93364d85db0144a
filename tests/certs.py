"""Test certificates made with the `openssl` command: a CA and the server and client certificates it
signs (EC P-256: quick to make). The README's TLS section shows the same commands."""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

_NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_SERVER_EXTENSIONS = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
"""
_CLIENT_EXTENSIONS = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
"""


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path

    def der(self) -> bytes:
        """The certificate in DER form, as `ssl.SSLSocket.getpeercert(binary_form=True)` returns it."""
        result = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True, capture_output=True
        )
        return result.stdout


@dataclass(frozen=True)
class Authority:
    """A CA in `directory`: `cert` is what servers and clients trust, `issue` signs a new certificate."""

    directory: Path
    name: str

    @property
    def cert(self) -> Path:
        return self.directory / f"{self.name}.pem"

    @property
    def key(self) -> Path:
        return self.directory / f"{self.name}.key"

    @classmethod
    def create(cls, directory: Path, name: str) -> Authority:
        authority = cls(directory, name)
        _openssl(
            "req", "-x509", *_NEW_KEY, "-keyout", str(authority.key), "-out", str(authority.cert), "-days", "2",
            "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        return authority

    def issue(self, common_name: str, server: bool) -> Pair:
        """A certificate for `common_name` (a server's is valid for 127.0.0.1 and localhost)."""
        stem = self.directory / f"{common_name}-{secrets.token_hex(4)}"
        pair = Pair(stem.with_suffix(".pem"), stem.with_suffix(".key"))
        extensions, request = stem.with_suffix(".ext"), stem.with_suffix(".csr")
        extensions.write_text(_SERVER_EXTENSIONS if server else _CLIENT_EXTENSIONS)
        _openssl(
            "req", "-new", *_NEW_KEY, "-keyout", str(pair.key), "-out", str(request), "-subj", f"/CN={common_name}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(request), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-set_serial", f"0x{secrets.token_hex(8)}", "-days", "2", "-extfile", str(extensions),
            "-out", str(pair.cert),
        )  # fmt: skip
        return pair
