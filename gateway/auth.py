"""Bearer tokens → roles: who may read, change traffic, or administer the gateway.

Roles are ordered, `viewer` < `operator` < `admin`; a role may do everything the roles below it may.
Tokens are 256-bit random strings shown once at creation; the tokens file (JSON, mode 0600, replaced
atomically) keeps only their SHA-256. A fast hash is the right one here: slow password hashes exist to
make guessing low-entropy secrets expensive, and no amount of hashing speed makes a 2**256 search
feasible, while a request authenticates in about a microsecond. Presented tokens are compared with
`hmac.compare_digest` against every stored digest, so timing says nothing about which one matched.

On first start with no tokens, `TokenStore.bootstrap` creates an admin token and writes it to
`<state_dir>/admin.token` (0600), so the gateway is secure by default and the local CLI still works
without setup. Several processes may manage tokens at once: changes happen under an exclusive lock on
`<tokens file>.lock`, re-reading the file first, and `refresh` lets a running process pick them up.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

from gateway.errors import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
"""Every role, lowest first."""

TOKENS_FILE = "tokens.json"
"""The tokens file's default name inside the state directory."""
ADMIN_TOKEN_FILE = "admin.token"
"""Where `bootstrap` writes the first admin token, inside the state directory."""
TOKEN_PREFIX = "cgw_"
"""Marks our tokens, so secret scanners and people can recognise a leaked one."""
BOOTSTRAP_NAME = "bootstrap-admin"

_FORMAT = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_IMPLIED: dict[str, frozenset[Role]] = {role: frozenset(ROLES[: i + 1]) for i, role in enumerate(ROLES)}


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: the token's name and role."""

    name: str
    role: Role

    @property
    def roles(self) -> frozenset[Role]:
        """The role and every role below it: what this caller may act as."""
        return _IMPLIED[self.role]


@dataclass(frozen=True)
class TokenRecord:
    """One stored token: never the token itself, only its SHA-256."""

    name: str
    role: Role
    sha256: str
    created_ns: int


def check_role(role: str, field: str = "role") -> Role:
    """`role` as a Role, or InvalidArgument naming the field and the value."""
    if role not in ROLES:
        raise InvalidArgument(f"{field}: {role!r} is not a role; roles are {', '.join(ROLES)}")
    return cast(Role, role)


def require(identity: Identity, role: Role, action: str) -> None:
    """PermissionDenied unless the caller's role is `role` or above; `action` names what was refused."""
    if role not in identity.roles:
        raise PermissionDenied(f"{action} needs role {role!r}; caller {identity.name!r} has role {identity.role!r}")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`, readable and writable by this user only (0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


_DIGEST = re.compile(r"[0-9a-f]{64}")


def _record_of(entry: dict[str, Any]) -> TokenRecord:
    """One hand-editable entry of the tokens file, checked as `create` would have made it: a bad digest
    used to fail every admin call with UNKNOWN, and a name like `cert:alice` could pass for a certificate."""
    name, role, digest, created_ns = entry["name"], check_role(entry["role"]), entry["sha256"], entry["created_ns"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name {name!r} is not a token name ({_NAME.pattern})")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"token {name!r}: sha256 is not 64 lowercase hex digits")
    if not isinstance(created_ns, int) or isinstance(created_ns, bool):
        raise ValueError(f"token {name!r}: created_ns {created_ns!r} is not a time in ns")
    return TokenRecord(name, role, digest, created_ns)


class TokenStore:
    """The tokens file at `path` and the digests it holds, loaded once and on `refresh`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._records: tuple[TokenRecord, ...] = ()
        self._identities: tuple[tuple[bytes, Identity], ...] = ()
        self.refresh()

    @property
    def records(self) -> tuple[TokenRecord, ...]:
        """The stored tokens (names, roles, digests, creation times), oldest first."""
        return self._records

    def refresh(self) -> bool:
        """Re-read the file if another process changed it since; True if it did."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self._set(self._read(), stamp)
        return True

    def create(self, role: str, name: str) -> str:
        """A new token for `name` with `role`; the plaintext is returned once and never stored."""
        checked_role = check_role(role)
        if not _NAME.fullmatch(name):
            raise InvalidArgument(f"name: {name!r} must be 1-64 letters, digits, '.', '_', '-', starting alphanumeric")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._locked() as records:
            if any(r.name == name for r in records):
                raise AlreadyExists(f"name: a token named {name!r} already exists; revoke it first")
            records.append(TokenRecord(name, checked_role, _digest(token).hex(), time.time_ns()))
        return token

    def revoke(self, name: str) -> None:
        """Remove the token named `name`; requests carrying it are refused from the next `refresh` on.

        The last admin token cannot be revoked (FailedPrecondition): without one nobody could administer the
        gateway, and `bootstrap` only creates one when there are no tokens at all. The check reads the records
        under the file lock, so two admins revoking each other at once, in two workers, cannot both succeed.
        """
        with self._locked() as records:
            kept = [r for r in records if r.name != name]
            if len(kept) == len(records):
                raise NotFound(f"name: no token named {name!r}")
            admins = [r.name for r in records if r.role == "admin"]
            if admins == [name]:
                raise FailedPrecondition(f"name: {name!r} is the last admin token; create another admin token first")
            records[:] = kept

    def authenticate(self, authorization: str | None) -> Identity:
        """The caller of an `authorization: Bearer <token>` metadata value, or Unauthenticated.

        Messages never repeat the presented token: it may be a real secret sent to the wrong place.
        """
        if not authorization:
            raise Unauthenticated("authorization: missing; send metadata 'authorization: Bearer <token>'")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization: expected 'Bearer <token>'")
        digest = _digest(token)
        found: Identity | None = None
        for stored, identity in self._identities:  # no early exit: the time does not depend on the match
            if hmac.compare_digest(stored, digest):
                found = identity
        if found is None:
            raise Unauthenticated("authorization: unknown or revoked token")
        return found

    def bootstrap(self, state_dir: str | Path) -> Path | None:
        """On a first start (no tokens at all), create an admin token in `<state_dir>/admin.token` (0600).

        Returns the file's path, for the gateway to print, or None when tokens already exist.
        """
        directory = Path(state_dir)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked() as records:
            if records:
                return None
            token = TOKEN_PREFIX + secrets.token_urlsafe(32)
            token_path = directory / ADMIN_TOKEN_FILE
            _write_private(token_path, (token + "\n").encode())
            records.append(TokenRecord(BOOTSTRAP_NAME, "admin", _digest(token).hex(), time.time_ns()))
        return token_path

    def _set(self, records: tuple[TokenRecord, ...], stamp: tuple[int, int, int] | None) -> None:
        self._records = records
        self._identities = tuple((bytes.fromhex(r.sha256), Identity(r.name, r.role)) for r in records)
        self._stamp = stamp

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> tuple[TokenRecord, ...]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return ()
        except ValueError as e:
            raise ConfigError(f"{self.path}: not a tokens file: {e}") from e
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("tokens"), list):
            raise ConfigError(f"{self.path}: not a tokens file of format {_FORMAT}")
        try:
            records = tuple(_record_of(t) for t in data["tokens"])
        except (KeyError, TypeError, ValueError, InvalidArgument) as e:
            raise ConfigError(f"{self.path}: malformed token entry: {e}") from e
        names = [r.name for r in records]
        if len(set(names)) < len(names):  # the last-admin check counts admins by name
            repeated = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"{self.path}: malformed token entry: name {repeated!r} appears twice")
        return records

    @contextmanager
    def _locked(self) -> Iterator[list[TokenRecord]]:
        """The current records, under the file lock, written back (0600, atomically) if the block succeeds."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            records = list(self._read())
            before = list(records)
            yield records
            if records != before:
                payload = {
                    "format": _FORMAT,
                    "tokens": [
                        {"name": r.name, "role": r.role, "sha256": r.sha256, "created_ns": r.created_ns}
                        for r in records
                    ],
                }
                _write_private(self.path, json.dumps(payload, indent=2).encode() + b"\n")
            self._set(tuple(records), self._file_stamp())
        finally:
            os.close(lock_fd)  # releases the lock
