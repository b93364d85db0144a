"""`canary-gateway routes | tokens | whoami` as an operator runs them: subprocesses against a real gateway.

The module has its own gateway, so its route changes never reach the session gateway's tests. Each test
sets the route state it depends on, except the first two, which see mlp before and at its first change.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import GatewayProcess

from gateway.protocol import Stub
from gateway.protocol import inference as pb

EXIT_USAGE, EXIT_AUTH, EXIT_REFUSED, EXIT_UNAVAILABLE = 2, 3, 4, 5


@pytest.fixture(scope="module")
def gw(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(repository, None, tmp_path_factory.mktemp("admin-cli"))
    gateway.wait_ready()
    yield gateway
    assert gateway.stop() == 0, gateway.log


def cli(
    gateway: GatewayProcess | None, *args: str, token: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m gateway ARGS` aimed at `gateway` (its address and state directory) unless ARGS say otherwise."""
    command = [sys.executable, "-m", "gateway", *args]
    if gateway is not None:
        command += ["--address", gateway.address, "--state-dir", str(gateway.state_dir)]
    if token is not None:
        command += ["--token", token]
    environment = {k: v for k, v in os.environ.items() if k != "CANARY_GATEWAY_TOKEN"} | (env or {})
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=60)


def ok(gateway: GatewayProcess, *args: str, token: str | None = None) -> str:
    result = cli(gateway, *args, token=token)
    assert result.returncode == 0, result.stderr
    return result.stdout


def as_json(gateway: GatewayProcess, *args: str, token: str | None = None) -> Any:
    return json.loads(ok(gateway, *args, "--json", token=token))


def mlp_route(gateway: GatewayProcess) -> Any:
    (route,) = as_json(gateway, "routes", "show", "mlp")["routes"]
    return route


def split_of(route: Any) -> dict[str, int]:
    return {share["version"]: share["bps"] for share in route["split"]}


def row(text: str, first_cell: str) -> list[str]:
    """The cells of the table row that starts with `first_cell` (cells are two or more spaces apart)."""
    for line in text.splitlines():
        if line.split("  ")[0] == first_cell:
            return [cell.strip() for cell in line.split("  ") if cell.strip()]
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


def new_token(gateway: GatewayProcess, role: str, name: str) -> str:
    token = ok(gateway, "tokens", "create", "--role", role, "--name", name).strip()
    assert token.startswith("cgw_") and "\n" not in token
    return token


def test_show_before_any_route_serves_the_highest_version(gw: GatewayProcess) -> None:
    text = ok(gw, "routes", "show")
    assert text.splitlines()[0].split() == ["MODEL", "ROUTE", "SPLIT", "STICKY", "KEY", "SHADOWS", "PINNING", "READY"]
    assert row(text, "mlp") == ["mlp", "default", "2=100%", "-", "-", "allowed", "1 2"]
    assert row(text, "two_outputs")[:3] == ["two_outputs", "default", "1=100%"]
    route = mlp_route(gw)
    assert route["explicit"] is False and split_of(route) == {"2": 10000}
    assert route["ready_versions"] == ["1", "2"] and route["sticky_key"] is None and route["shadows"] == []
    assert as_json(gw, "routes", "history", "mlp") == {"entries": []}


def test_split_is_shown_and_recorded_with_who_why_before_and_after(gw: GatewayProcess) -> None:
    changed = ok(gw, "routes", "split", "mlp", "1=99.5", "2=0.5", "--reason", "half a percent canary")
    assert "mlp: split applied" in changed and "by bootstrap-admin: half a percent canary" in changed
    assert "split highest version → 1=99.5% 2=0.5%" in changed
    (first,) = as_json(gw, "routes", "history", "mlp")["entries"]
    assert first["before"] is None and split_of(first["after"]) == {"1": 9950, "2": 50}  # mlp had no route
    assert row(ok(gw, "routes", "show", "mlp"), "mlp")[:3] == ["mlp", "set", "1=99.5% 2=0.5%"]

    ok(gw, "routes", "split", "mlp", "2=10 1=90", "--reason", "canary 10%")  # one quoted argument, any order
    route = mlp_route(gw)
    assert route["explicit"] is True and split_of(route) == {"1": 9000, "2": 1000}
    assert route["split"][1] == {"version": "2", "bps": 1000, "percent": 10.0}

    last = as_json(gw, "routes", "history", "mlp", "--limit", "1")["entries"]
    assert len(last) == 1
    entry = last[0]
    assert {key: entry[key] for key in ("who", "why", "action", "model")} == {
        "who": "bootstrap-admin", "why": "canary 10%", "action": "split", "model": "mlp"
    }  # fmt: skip
    assert split_of(entry["before"]) == {"1": 9950, "2": 50} and split_of(entry["after"]) == {"1": 9000, "2": 1000}
    assert abs(entry["time_ns"] - time.time_ns()) < 60e9
    history = ok(gw, "routes", "history", "mlp", "--since", "1h")
    assert row(history, str(entry["seq"]))[2:] == [
        "bootstrap-admin", "split", "mlp", "canary 10%", "split 1=99.5% 2=0.5% → 1=90% 2=10%"
    ]  # fmt: skip


def test_a_change_without_a_reason_is_a_usage_error(gw: GatewayProcess) -> None:
    result = cli(gw, "routes", "split", "mlp", "1=50", "2=50")
    assert result.returncode == EXIT_USAGE
    assert "the following arguments are required: --reason" in result.stderr
    malformed = cli(gw, "routes", "split", "mlp", "1:50", "--reason", "typo")
    assert malformed.returncode == EXIT_USAGE and "'1:50' is not VERSION=PERCENT" in malformed.stderr


def test_a_split_not_summing_to_100_is_refused_and_changes_nothing(gw: GatewayProcess) -> None:
    ok(gw, "routes", "split", "mlp", "1=90", "2=10", "--reason", "known state")
    table_before = ok(gw, "routes", "show")
    history_before = as_json(gw, "routes", "history")
    result = cli(gw, "routes", "split", "mlp", "1=90", "2=5", "--reason", "fat fingers")
    assert result.returncode == EXIT_REFUSED
    assert result.stderr.strip() == (
        "canary-gateway: INVALID_ARGUMENT: split: weights sum to 95% (9500 bps); they must sum to 100% (10000 bps)"
    )
    assert result.stdout == ""
    assert ok(gw, "routes", "show") == table_before
    assert as_json(gw, "routes", "history") == history_before
    unknown = cli(gw, "routes", "split", "nosuch", "1=100", "--reason", "typo")
    assert unknown.returncode == EXIT_REFUSED and "NOT_FOUND" in unknown.stderr and "'nosuch'" in unknown.stderr


def test_a_version_named_with_unicode_digits_is_refused_like_any_version_that_is_not_ready(gw: GatewayProcess) -> None:
    ok(gw, "routes", "split", "mlp", "1=100", "--reason", "one version, as a rollout starts from")
    for args, field, name in (
        (("routes", "split", "mlp", "²=100"), "split", "²"),
        (("routes", "promote", "mlp", "²"), "split", "²"),
        (("routes", "shadow", "mlp", "١=5"), "shadows", "١"),
        (("rollout", "start", "mlp", "--candidate", "²"), "split", "²"),
    ):
        result = cli(gw, *args, "--reason", "typo")
        assert result.returncode == EXIT_REFUSED, result.stderr
        assert result.stderr.strip() == (
            f"canary-gateway: FAILED_PRECONDITION: {field}: model 'mlp' version '{name}' is not ready (ready: 1, 2)"
        )


def test_repeating_the_current_route_reports_no_change_and_logs_nothing(gw: GatewayProcess) -> None:
    alice, bob = new_token(gw, "operator", "alice"), new_token(gw, "operator", "bob")
    ok(gw, "routes", "split", "mlp", "1=90", "2=10", "--reason", "alice's canary", token=alice)
    history = as_json(gw, "routes", "history", "mlp")
    text = ok(gw, "routes", "split", "mlp", "2=10", "1=90", "--reason", "bob, same split", token=bob)
    assert text.splitlines()[0] == "mlp: route already in place; split changed nothing and was not logged"
    assert "bob" not in text and "alice" not in text  # bob was told change N by bob: alice's change
    repeated = as_json(gw, "routes", "split", "mlp", "1=90", "2=10", "--reason", "bob again", token=bob)
    assert repeated["entry"]["seq"] == 0 and repeated["entry"]["before"] == repeated["entry"]["after"]
    assert as_json(gw, "routes", "history", "mlp") == history


def test_a_viewer_can_show_but_not_split(gw: GatewayProcess) -> None:
    viewer = new_token(gw, "viewer", "dashboard")
    assert "mlp" in ok(gw, "routes", "show", token=viewer)
    assert as_json(gw, "whoami", token=viewer)["role"] == "viewer"
    before = mlp_route(gw)
    result = cli(gw, "routes", "split", "mlp", "1=50", "2=50", "--reason", "not mine to change", token=viewer)
    assert result.returncode == EXIT_AUTH
    assert result.stderr.startswith("canary-gateway: PERMISSION_DENIED: ")
    assert "needs role 'operator'; caller 'dashboard' has role 'viewer' (token from --token)" in result.stderr
    assert mlp_route(gw) == before
    from_env = cli(gw, "tokens", "list", env={"CANARY_GATEWAY_TOKEN": viewer})
    assert from_env.returncode == EXIT_AUTH and "(token from $CANARY_GATEWAY_TOKEN)" in from_env.stderr


def test_tokens_create_list_revoke_round_trip(gw: GatewayProcess) -> None:
    token = new_token(gw, "operator", "ci-deployer")
    assert row(ok(gw, "tokens", "list"), "ci-deployer")[:2] == ["ci-deployer", "operator"]
    listed = {t["name"]: t["role"] for t in as_json(gw, "tokens", "list")["tokens"]}
    assert listed["ci-deployer"] == "operator" and listed["bootstrap-admin"] == "admin"
    assert token not in ok(gw, "tokens", "list", "--json")

    assert as_json(gw, "whoami", token=token)["name"] == "ci-deployer"
    ok(gw, "routes", "split", "mlp", "1=80", "2=20", "--reason", "deploy from CI", token=token)
    assert as_json(gw, "routes", "history", "--limit", "1")["entries"][0]["who"] == "ci-deployer"

    assert ok(gw, "tokens", "revoke", "ci-deployer").strip() == "revoked token 'ci-deployer'"
    assert "ci-deployer" not in ok(gw, "tokens", "list")
    refused = cli(gw, "whoami", token=token)
    assert refused.returncode == EXIT_AUTH
    assert refused.stderr.strip() == (
        "canary-gateway: UNAUTHENTICATED: authorization: unknown or revoked token (token from --token)"
    )
    again = cli(gw, "tokens", "revoke", "ci-deployer")
    assert again.returncode == EXIT_REFUSED and "NOT_FOUND: name: no token named 'ci-deployer'" in again.stderr


def test_the_admin_token_file_is_used_when_no_token_is_given(gw: GatewayProcess, tmp_path: Path) -> None:
    token_file = gw.state_dir / "admin.token"
    assert ok(gw, "whoami").strip() == f"bootstrap-admin (admin) at {gw.address}, token from {token_file}"
    elsewhere = cli(None, "whoami", "--address", gw.address, "--state-dir", str(tmp_path))
    assert elsewhere.returncode == EXIT_AUTH
    assert "no token: pass --token, set CANARY_GATEWAY_TOKEN" in elsewhere.stderr
    assert str(tmp_path / "admin.token") in elsewhere.stderr


def test_promote_then_rollback(gw: GatewayProcess) -> None:
    ok(gw, "routes", "split", "mlp", "1=90", "2=10", "--reason", "canary")
    promoted = ok(gw, "routes", "promote", "mlp", "2", "--reason", "canary is healthy")
    assert "split 1=90% 2=10% → 2=100%" in promoted
    assert split_of(mlp_route(gw)) == {"2": 10000}
    ok(gw, "routes", "rollback", "mlp", "--reason", "error rate up")
    assert split_of(mlp_route(gw)) == {"1": 9000, "2": 1000}
    actions = [(e["action"], e["why"]) for e in as_json(gw, "routes", "history", "mlp", "--limit", "2")["entries"]]
    assert actions == [("promote", "canary is healthy"), ("rollback", "error rate up")]
    missing = cli(gw, "routes", "promote", "mlp", "7", "--reason", "no such version")
    assert missing.returncode == EXIT_REFUSED and "FAILED_PRECONDITION" in missing.stderr
    never_changed = cli(gw, "routes", "rollback", "two_outputs", "--reason", "nothing to undo")
    assert never_changed.returncode == EXIT_REFUSED and "no route change to roll back" in never_changed.stderr


def test_sticky_and_pin(gw: GatewayProcess) -> None:
    ok(gw, "routes", "sticky", "mlp", "--key", "x-user-id", "--reason", "keep users on one version")
    ok(gw, "routes", "pin", "mlp", "--forbid", "--reason", "clients must follow the split")
    route = mlp_route(gw)
    assert route["sticky_key"] == "x-user-id" and route["allow_pinning"] is False
    assert row(ok(gw, "routes", "show", "mlp"), "mlp")[3] == "x-user-id"
    ok(gw, "routes", "sticky", "mlp", "--none", "--reason", "back to random")
    ok(gw, "routes", "pin", "mlp", "--allow", "--reason", "pinning again")
    route = mlp_route(gw)
    assert route["sticky_key"] is None and route["allow_pinning"] is True
    assert cli(gw, "routes", "pin", "mlp", "--reason", "which?").returncode == EXIT_USAGE


def test_override_roles_decide_who_may_send_x_route_version(gw: GatewayProcess) -> None:
    operator = ok(gw, "tokens", "create", "--role", "operator", "--name", "override-tester").strip()
    request = pb.ModelInferRequest(model_name="mlp", id="override-1")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 32])
    request.raw_input_contents.append(np.zeros((1, 32), dtype=np.float32).tobytes())

    def version_for(token: str) -> str:
        with grpc.insecure_channel(gw.address) as channel:
            metadata = [("authorization", f"Bearer {token}"), ("x-route-version", "2")]
            return str(Stub(channel).ModelInfer(request, metadata=metadata, timeout=10).model_version)

    assert version_for(operator) == "2"  # operators may override by default
    ok(gw, "routes", "override", "mlp", "--roles", "admin", "--reason", "only admins test versions")
    assert mlp_route(gw)["override_roles"] == ["admin"]
    with pytest.raises(grpc.RpcError) as refused:
        version_for(operator)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert version_for((gw.state_dir / "admin.token").read_text().strip()) == "2"
    ok(gw, "routes", "override", "mlp", "--roles", "operator,admin", "--reason", "operators again")
    assert cli(gw, "routes", "override", "mlp", "--roles", "root", "--reason", "x").returncode == EXIT_USAGE


def _infer_mlp(address: str, count: int) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = Stub(channel)
        for i in range(count):
            request = pb.ModelInferRequest(model_name="mlp", id=f"admin-cli-{i}")
            request.inputs.add(name="input", datatype="FP32", shape=[1, 32])
            request.raw_input_contents.append(np.full((1, 32), i, dtype=np.float32).tobytes())
            assert stub.ModelInfer(request, timeout=10).model_version == "1"


def test_shadow_then_agreement(gw: GatewayProcess) -> None:
    ok(gw, "routes", "split", "mlp", "1=100", "--reason", "all on v1")
    shadowed = ok(gw, "routes", "shadow", "mlp", "2=100", "--reason", "compare v2 on all traffic")
    assert "shadows - → 2=100%" in shadowed
    assert [s["version"] for s in mlp_route(gw)["shadows"]] == ["2"]
    _infer_mlp(gw.address, 5)
    deadline = time.monotonic() + 10
    while True:  # shadows run after the answers: wait for them to be counted
        (stat,) = as_json(gw, "routes", "agreement", "mlp")["stats"]
        if stat["compared"] + stat["failed"] + stat["shed"] >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (stat["model"], stat["primary_version"], stat["shadow_version"]) == ("mlp", "1", "2")
    assert stat["compared"] == 5 and stat["agreed"] == 0 and stat["rate"] == 0.0  # different weights disagree
    text = ok(gw, "routes", "agreement")
    assert text.splitlines()[0].split() == [
        "MODEL",
        "PRIMARY",
        "SHADOW",
        "COMPARED",
        "AGREED",
        "RATE",
        "SHED",
        "FAILED",
    ]
    assert row(text, "mlp") == ["mlp", "1", "2", "5", "0", "0%", "0", "0"]
    ok(gw, "routes", "shadow", "mlp", "--reason", "comparison done")
    assert mlp_route(gw)["shadows"] == []


def test_connection_refused_names_the_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    result = cli(None, "routes", "show", "--address", address, "--token", "cgw_anything")
    assert result.returncode == EXIT_UNAVAILABLE
    assert result.stderr.strip() == (
        f"canary-gateway: UNAVAILABLE: cannot reach a gateway at {address}: connection refused "
        "(is it running? see --address)"
    )


@pytest.mark.parametrize(
    ("argv", "refusal"),
    [
        (["routes", "history", "mlp", "--limit", "²"], "'²' is not a count"),
        (["rollout", "start", "mlp", "--candidate", "2", "--min-requests", "²"], "'²' is not a count"),
        (["log", "query", "--since", "²"], "not a time: '²'"),
        (["log", "query", "--status", "²"], "unknown status '²'"),
    ],
)
def test_numbers_in_other_scripts_are_usage_errors_not_tracebacks(argv: list[str], refusal: str) -> None:
    """str.isdigit is true of "²", which int() refuses: these arguments raised ValueError (exit 1)."""
    result = subprocess.run([sys.executable, "-m", "gateway", *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and refusal in result.stderr, result.stderr
