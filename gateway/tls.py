"""TLS and mTLS for the gateway's ports: server credentials whose files are re-read when they change,
and the caller identity that a verified client certificate carries.

gRPC asks for the certificate configuration at every new connection's handshake. `CertificateFiles`
answers "unchanged" unless the files changed since that port last took them, checking the files at
most every `tls.reload_interval_s`, so a rotated certificate is served to new connections without a
restart (connections already open keep the certificate they were made with). A changed set of files
that does not load (a half-written file, a key that does not match its certificate) is logged and the
previous certificate stays in use, so a botched rotation never takes the gateway off the air.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
import time
from pathlib import Path

import grpc

from gateway.auth import Identity, Role
from gateway.config import TlsConfig, bare_host
from gateway.errors import ConfigError

log = logging.getLogger(__name__)

CERT_CALLER_PREFIX = "cert:"
"""Marks a caller named by its client certificate. Token names cannot contain ':', so a certificate
can never pass for a token's name (or the other way round) in the request log or the change log."""

Stamp = tuple[tuple[int, int, int], ...]
"""(inode, mtime ns, size) of each file: any replacement or rewrite changes it."""


def is_loopback(host: str) -> bool:
    """True when `host` is reachable only from this machine (plaintext is acceptable there)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare_host(host)).is_loopback  # "[::1]" too, as URLs write it
    except ValueError:  # a host name or "": it may resolve to anything, so assume not
        return False


def _no_password() -> bytes:
    return b""  # an encrypted key fails to load instead of prompting on the terminal


class CertificateFiles:
    """The certificate chain, its key and the optional client CA named by `[tls]`, as gRPC credentials."""

    def __init__(self, config: TlsConfig) -> None:
        self._config = config
        self._paths = [Path(p) for p in (config.cert_file, config.key_file, config.client_ca_file) if p]
        self._lock = threading.Lock()
        try:
            self._stamp, self._current = self._load()
        except ValueError as e:
            raise ConfigError(f"tls: {e}") from None
        self._generation = 0  # bumped at every reload; each port remembers the one it serves
        self._refused: Stamp | None = None  # the last changed set that failed to load, reported once
        self._checked = time.monotonic()

    @property
    def mutual(self) -> bool:
        """True when clients must present a certificate signed by the client CA."""
        return bool(self._config.client_ca_file)

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for one port, re-reading the files when they change."""
        served = self._generation

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal served
            generation, configuration = self._latest()
            if generation == served:
                return None  # unchanged: gRPC keeps the configuration it has
            served = generation
            return configuration

        return grpc.dynamic_ssl_server_credentials(self._current, fetch, require_client_authentication=self.mutual)

    def _latest(self) -> tuple[int, grpc.ServerCertificateConfiguration]:
        # Called by gRPC's threads at each handshake, possibly several at once.
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self._config.reload_interval_s:
                self._checked = now
                self._reload_if_changed()
            return self._generation, self._current

    def _reload_if_changed(self) -> None:
        stamp = self._stat()
        if stamp == self._stamp or stamp == self._refused:
            return
        try:
            stamp, configuration = self._load()
        except ValueError as e:
            log.warning("tls: keeping the current certificate: %s", e)
            self._refused = stamp  # not again until the files change once more
            return
        self._stamp, self._current, self._refused = stamp, configuration, None
        self._generation += 1
        log.info("tls: certificate files changed; new connections get the new certificate")

    def _stat(self) -> Stamp:
        stamps = []
        for path in self._paths:
            try:
                st = path.stat()
            except OSError:  # missing for a moment during a rotation: reading it will say so
                stamps.append((-1, -1, -1))
                continue
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def _load(self) -> tuple[Stamp, grpc.ServerCertificateConfiguration]:
        """The files' contents as a gRPC certificate configuration, checked to load as a set."""
        before = self._stat()
        try:
            contents = [path.read_bytes() for path in self._paths]
        except OSError as e:
            raise ValueError(f"cannot read {e.filename}: {e.strerror}") from None
        # gRPC would only fail at the next handshake; Python's OpenSSL says now which file is wrong.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert_file, key_file = self._config.cert_file, self._config.key_file
        try:
            context.load_cert_chain(cert_file, key_file, password=_no_password)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"{cert_file} and {key_file} are not a PEM certificate chain and its key: {e}") from None
        if self.mutual:
            try:
                context.load_verify_locations(cafile=self._config.client_ca_file)
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"{self._config.client_ca_file} is not a PEM CA bundle: {e}") from None
        if self._stat() != before:
            raise ValueError("the certificate files changed while being read")
        cert, key = contents[0], contents[1]
        configuration = grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=contents[2] if self.mutual else None
        )
        return before, configuration


class CertificateCaller:
    """`identify(context)`: the caller named by the call's verified client certificate, if any.

    The name is the certificate's subject common name (else its whole subject), prefixed `cert:`.
    Only meaningful on mTLS ports, where gRPC has verified the certificate against the client CA.
    """

    def __init__(self, role: Role) -> None:
        self.role = role  # tls.client_cert_role

    def identify(self, context: grpc.aio.ServicerContext) -> Identity | None:
        auth = context.auth_context()
        names = auth.get("x509_common_name") or auth.get("x509_subject")
        if not names:
            return None
        name = next(iter(names))
        return Identity(CERT_CALLER_PREFIX + name.decode("utf-8", "replace"), self.role)
