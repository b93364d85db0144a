"""Tokens → roles: creation, authentication, revocation, the role ladder, bootstrap, file permissions."""

from __future__ import annotations

import json
import stat
import threading
from pathlib import Path

import grpc
import pytest

from gateway.auth import (
    ROLES,
    AlreadyExists,
    Identity,
    PermissionDenied,
    TokenStore,
    Unauthenticated,
    require,
)
from gateway.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def tokens(tmp_path: Path) -> TokenStore:
    return TokenStore(tmp_path / "state" / "tokens.json")


def test_a_created_token_authenticates_as_its_name_and_role(tokens: TokenStore) -> None:
    token = tokens.create("operator", "ci-deployer")
    assert token.startswith("cgw_") and len(token) > 40
    assert tokens.authenticate(f"Bearer {token}") == Identity("ci-deployer", "operator")
    assert tokens.authenticate(f"bearer  {token} ") == Identity("ci-deployer", "operator")
    assert [(r.name, r.role) for r in tokens.records] == [("ci-deployer", "operator")]


def test_the_tokens_file_holds_digests_only_and_is_private(tokens: TokenStore) -> None:
    token = tokens.create("admin", "root")
    text = tokens.path.read_text()
    assert token not in text and token[4:] not in text
    assert json.loads(text)["tokens"][0]["name"] == "root"
    assert _mode(tokens.path) == 0o600
    assert list(tokens.path.parent.glob("*.tmp")) == []


@pytest.mark.parametrize(
    "value, fragment",
    [
        (None, "authorization: missing"),
        ("", "authorization: missing"),
        ("Basic dXNlcjpwYXNz", "expected 'Bearer <token>'"),
        ("Bearer", "expected 'Bearer <token>'"),
        ("Bearer    ", "expected 'Bearer <token>'"),
        ("Bearer cgw_not-a-real-token", "unknown or revoked token"),
    ],
)
def test_bad_credentials_are_unauthenticated(tokens: TokenStore, value: str | None, fragment: str) -> None:
    tokens.create("viewer", "someone")
    with pytest.raises(Unauthenticated) as e:
        tokens.authenticate(value)
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert fragment in e.value.message
    assert "not-a-real-token" not in e.value.message  # never echo a secret


def test_a_revoked_token_is_refused_here_and_in_other_processes_after_refresh(tokens: TokenStore) -> None:
    token = tokens.create("operator", "laptop")
    other = TokenStore(tokens.path)  # another worker process reading the same file
    assert other.authenticate(f"Bearer {token}").name == "laptop"
    tokens.revoke("laptop")
    with pytest.raises(Unauthenticated):
        tokens.authenticate(f"Bearer {token}")
    assert other.refresh() is True and other.refresh() is False
    with pytest.raises(Unauthenticated):
        other.authenticate(f"Bearer {token}")
    with pytest.raises(NotFound, match="name: no token named 'laptop'"):
        tokens.revoke("laptop")


def test_changes_from_two_stores_are_both_kept(tokens: TokenStore) -> None:
    other = TokenStore(tokens.path)
    first = tokens.create("viewer", "one")
    second = other.create("viewer", "two")  # re-reads the file under the lock: "one" survives
    reopened = TokenStore(tokens.path)
    assert reopened.authenticate(f"Bearer {first}").name == "one"
    assert reopened.authenticate(f"Bearer {second}").name == "two"


def test_two_admins_revoking_each_other_at_once_leave_one_admin(tokens: TokenStore) -> None:
    tokens.create("admin", "alice")
    tokens.create("admin", "bob")
    tokens.create("operator", "ci")
    stores = {"alice": TokenStore(tokens.path), "bob": TokenStore(tokens.path)}  # two workers, both see two admins
    start = threading.Barrier(2)
    refused: list[FailedPrecondition] = []

    def revoke(caller: str, victim: str) -> None:
        start.wait()
        try:
            stores[caller].revoke(victim)
        except FailedPrecondition as e:
            refused.append(e)

    threads = [threading.Thread(target=revoke, args=pair) for pair in (("alice", "bob"), ("bob", "alice"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (survivor,) = [r.name for r in TokenStore(tokens.path).records if r.role == "admin"]
    (error,) = refused
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.message == f"name: {survivor!r} is the last admin token; create another admin token first"
    with pytest.raises(FailedPrecondition):
        stores["alice"].revoke(survivor)  # a store that has not refreshed since is refused too
    tokens.revoke("ci")  # other roles' tokens may all go


def test_creation_errors_name_the_field(tokens: TokenStore) -> None:
    with pytest.raises(InvalidArgument, match="role: 'root' is not a role; roles are viewer, operator, admin"):
        tokens.create("root", "x")
    with pytest.raises(InvalidArgument, match="name: 'bad name'"):
        tokens.create("viewer", "bad name")
    tokens.create("viewer", "dup")
    with pytest.raises(AlreadyExists, match="name: a token named 'dup' already exists") as e:
        tokens.create("admin", "dup")
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert [r.role for r in TokenStore(tokens.path).records] == ["viewer"]


def test_each_role_may_do_exactly_what_its_rank_allows() -> None:
    for rank, role in enumerate(ROLES):
        identity = Identity("someone", role)
        for needed_rank, needed in enumerate(ROLES):
            if rank >= needed_rank:
                require(identity, needed, "this")
            else:
                with pytest.raises(PermissionDenied) as e:
                    require(identity, needed, "set split")
                assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
                assert e.value.message == f"set split needs role {needed!r}; caller 'someone' has role {role!r}"
    assert Identity("v", "viewer").roles == {"viewer"}
    assert Identity("a", "admin").roles == {"viewer", "operator", "admin"}


def test_bootstrap_creates_one_private_admin_token_on_first_start(tmp_path: Path) -> None:
    state = tmp_path / "gateway-state"
    tokens = TokenStore(state / "tokens.json")
    path = tokens.bootstrap(state)
    assert path == state / "admin.token"
    assert _mode(path) == 0o600 and _mode(state) == 0o700 and _mode(state / "tokens.json") == 0o600
    identity = TokenStore(state / "tokens.json").authenticate("Bearer " + path.read_text().strip())
    assert identity == Identity("bootstrap-admin", "admin")
    assert tokens.bootstrap(state) is None  # tokens exist: nothing new
    assert len(tokens.records) == 1


_DIGEST = "ab" * 32


@pytest.mark.parametrize(
    ("entries", "refusal"),
    [
        ([{"name": "ops", "role": "admin", "sha256": "zz" + "ab" * 31, "created_ns": 0}], "'ops': sha256 is not 64"),
        ([{"name": "cert:alice", "role": "admin", "sha256": _DIGEST, "created_ns": 0}], "'cert:alice' is not a token"),
        ([{"name": "ops", "role": "admin", "sha256": _DIGEST, "created_ns": "yesterday"}], "created_ns 'yesterday'"),
        ([{"name": "ops", "role": "admin", "sha256": _DIGEST, "created_ns": 0}] * 2, "name 'ops' appears twice"),
    ],
)
def test_a_hand_edited_entry_is_checked_as_create_would_have_made_it(
    tmp_path: Path, entries: list[dict[str, object]], refusal: str
) -> None:
    """A bad digest used to raise ValueError on every admin call (UNKNOWN); `cert:alice` could pass for a client
    certificate in the logs; two entries of one admin name let the last admin be revoked."""
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"format": 1, "tokens": entries}))
    with pytest.raises(ConfigError, match=f"malformed token entry: .*{refusal}"):
        TokenStore(path)


def test_bootstrap_does_nothing_when_tokens_exist(tokens: TokenStore, tmp_path: Path) -> None:
    tokens.create("operator", "ci")
    assert tokens.bootstrap(tmp_path / "state") is None
    assert not (tmp_path / "state" / "admin.token").exists()


def test_a_corrupt_tokens_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a tokens file"):
        TokenStore(path)
    path.write_text(
        json.dumps({"format": 1, "tokens": [{"name": "x", "role": "god", "sha256": "00", "created_ns": 0}]})
    )
    with pytest.raises(ConfigError, match="role: 'god'"):
        TokenStore(path)
