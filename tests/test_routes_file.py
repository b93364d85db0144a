"""`server.routes_file`: the route table from the deployment's configuration, applied at startup through
the validated, change-logged path (router.seed), against real LMDB stores and a real gateway."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import GatewayProcess
from models import identity_graph, save_model

from gateway.errors import ConfigError
from gateway.protocol import Stub
from gateway.protocol import inference as pb
from router.control import RouteControl
from router.rules import Route, StickyKey
from router.seed import WHO, apply_routes_file, load_routes_file
from router.store import RouteStore

READY = {"credit": frozenset({"1", "2", "3"}), "fraud": frozenset({"1", "2"})}

ROUTES = """
[routes.credit]
split = [["1", 9000], ["2", 1000]]
sticky_key = "x-user-id"
shadows = [["3", 5000]]

[routes.fraud]
split = [["2", 10000]]
allow_pinning = false
override_roles = ["admin"]
"""


@pytest.fixture
def control(tmp_path: Path) -> Iterator[RouteControl]:
    control = RouteControl(RouteStore(tmp_path / "routes"), lambda: READY)
    yield control
    control.close()


def _file(tmp_path: Path, text: str, name: str = "routes.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_file_reads_as_routes_in_the_shape_of_to_dict(tmp_path: Path) -> None:
    routes = load_routes_file(_file(tmp_path, ROUTES))
    assert routes["credit"] == Route(
        split=(("1", 9000), ("2", 1000)), sticky_key=StickyKey("metadata", "x-user-id"), shadows=(("3", 5000),)
    )
    assert routes["fraud"] == Route(split=(("2", 10000),), allow_pinning=False, override_roles=frozenset({"admin"}))
    assert {model: Route.from_dict(route.to_dict()) for model, route in routes.items()} == routes


def test_an_empty_store_takes_the_file_with_one_logged_change_per_model(control: RouteControl, tmp_path: Path) -> None:
    path = _file(tmp_path, ROUTES)
    entries = apply_routes_file(control, path, READY)
    assert [(e.model, e.who, e.why, e.action, e.before) for e in entries] == [
        ("credit", WHO, f"routes_file {path}", "config", None),
        ("fraud", WHO, f"routes_file {path}", "config", None),
    ]
    assert dict(control.table.routes) == load_routes_file(path)
    assert [e.seq for e in control.history(None, None, None)] == [1, 2]


def test_a_matching_table_writes_nothing(control: RouteControl, tmp_path: Path) -> None:
    path = _file(tmp_path, ROUTES)
    apply_routes_file(control, path, READY)
    version = control.table.version
    assert apply_routes_file(control, path, READY) == []
    assert control.table.version == version
    assert len(control.history(None, None, None)) == 2


def test_the_file_replaces_an_operators_edit_and_rollback_undoes_that(control: RouteControl, tmp_path: Path) -> None:
    path = _file(tmp_path, ROUTES)
    apply_routes_file(control, path, READY)
    edited = Route(split=(("1", 5000), ("2", 5000)), sticky_key=StickyKey("metadata", "x-user-id"))
    control.change("credit", edited, who="alice", why="50/50 for a day", action="split")
    [entry] = apply_routes_file(control, path, READY)
    assert (entry.model, entry.before, entry.after) == ("credit", edited, load_routes_file(path)["credit"])
    control.rollback("credit", who="alice", why="keep my edit")
    assert control.route("credit") == edited


def test_a_model_with_a_rollout_under_way_keeps_its_route(control: RouteControl, tmp_path: Path) -> None:
    edited = Route(split=(("1", 9000), ("2", 1000)))
    control.change("credit", edited, who="rollout", why="step 1", action="split")
    control.change("fraud", Route(split=(("1", 10000),)), who="alice", why="pin v1", action="split")
    path = _file(tmp_path, '[routes.credit]\nsplit = [["2", 10000]]\n')
    entries = apply_routes_file(control, path, READY, rolling={"credit", "fraud"})
    assert entries == [] and control.route("credit") == edited and control.route("fraud") is not None


def test_a_model_the_file_does_not_name_loses_its_route(control: RouteControl, tmp_path: Path) -> None:
    control.change("fraud", Route(split=(("1", 10000),)), who="alice", why="pin v1", action="split")
    path = _file(tmp_path, '[routes.credit]\nsplit = [["2", 10000]]\n')
    entries = apply_routes_file(control, path, READY)
    assert [(e.model, e.after) for e in entries] == [("credit", Route(split=(("2", 10000),))), ("fraud", None)]
    assert set(control.table.routes) == {"credit"}
    assert apply_routes_file(control, _file(tmp_path, "[routes]\n", "empty.toml"), READY)[0].after is None
    assert control.table.routes == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no [routes] table"),
        ("[route.credit]\n", "unknown key 'route'"),
        ("[routes]\ncredit = 3\n", "routes.credit: expected a table"),
        ('[routes.credit]\nsplit = [["1", 9000]]\n', "routes.credit: split: weights sum to 90%"),
        ("[routes.credit]\nsplit = [[1, 10000]]\n", "routes.credit: split: version 1 must be"),
        ('[routes.credit]\nsplit = [["1", 10000]]\nweights = 1\n', "routes.credit: route: unknown field 'weights'"),
        ('[routes.credit]\nsticky_key = "x-user-id"\n', "routes.credit: route: field 'split' is required"),
        ("[routes.credit\n", "Expected ']'"),
    ],
)
def test_a_malformed_file_is_a_config_error_naming_the_file_and_the_model(
    tmp_path: Path, text: str, message: str
) -> None:
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError, match=r"server\.routes_file ") as caught:
        load_routes_file(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_a_file_that_is_not_utf8_is_a_config_error_naming_it(tmp_path: Path) -> None:
    """tomllib raises UnicodeDecodeError there, which used to escape as a traceback (exit 1, not 2)."""
    path = tmp_path / "routes.toml"
    path.write_bytes(b'[routes.credit]\nsplit = [["\xff", 10000]]\n')
    with pytest.raises(ConfigError, match=rf"server\.routes_file {path}: 'utf-8' codec can't decode"):
        load_routes_file(path)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_routes_file(tmp_path / "nope.toml")


def test_a_version_that_is_not_ready_refuses_the_whole_file(control: RouteControl, tmp_path: Path) -> None:
    path = _file(tmp_path, ROUTES.replace('[["2", 10000]]', '[["9", 10000]]'))
    with pytest.raises(ConfigError, match=r"routes\.fraud: split: model 'fraud' version '9' is not ready"):
        apply_routes_file(control, path, READY)
    assert control.table.routes == {} and control.history(None, None, None) == []  # credit was valid: not written
    with pytest.raises(ConfigError, match=r"routes\.other: model: 'other' has no ready versions"):
        apply_routes_file(control, _file(tmp_path, '[routes.other]\nsplit = [["1", 10000]]\n', "other.toml"), READY)


def test_the_config_key_is_server_routes_file(tmp_path: Path) -> None:
    from gateway import config

    loaded = config.from_dict({"server": {"routes_file": "deploy/routes.toml"}})
    assert loaded.server.routes_file == "deploy/routes.toml"
    assert config.GatewayConfig().server.routes_file == ""


# --- a real gateway --------------------------------------------------------------------------------


def _two_versions(tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    for version in ("1", "2"):
        save_model(repository, "ident", version, identity_graph("FP32"))
    return repository


def _served_by(address: str, user: str) -> str:
    request = pb.ModelInferRequest(model_name="ident")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), dtype=np.float32).tobytes())
    with grpc.insecure_channel(address) as channel:
        reply = Stub(channel).ModelInfer(request, metadata=[("x-user-id", user)], timeout=10)
    return str(reply.model_version)


def test_a_gateway_serves_the_files_routes_from_its_first_answer(tmp_path: Path) -> None:
    routes = _file(tmp_path, '[routes.ident]\nsplit = [["1", 10000]]\nsticky_key = "x-user-id"\n')
    gateway = GatewayProcess(_two_versions(tmp_path), f'[server]\nroutes_file = "{routes}"\n', tmp_path)
    try:
        gateway.wait_ready()
        # Without the file, the highest version (2) would answer.
        assert {_served_by(gateway.address, f"user-{i}") for i in range(20)} == {"1"}
    finally:
        assert gateway.stop() == 0, gateway.log
    assert f"routes_file {routes}: model ident now has split 1=100 (change 1)" in gateway.log
    with RouteStore(gateway.state_dir / "routes") as store:
        [entry] = store.history()
    assert (entry.who, entry.why, entry.action) == ("config", f"routes_file {routes}", "config")


def test_a_gateway_whose_file_names_a_missing_version_exits_with_code_2(tmp_path: Path) -> None:
    routes = _file(tmp_path, '[routes.ident]\nsplit = [["7", 10000]]\n')
    config = _file(tmp_path, f'[server]\nroutes_file = "{routes}"\n', "gateway.toml")
    args = ["--model-repository", str(_two_versions(tmp_path)), "--port", "0", "--state-dir", str(tmp_path / "s")]
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert f"server.routes_file {routes}: routes.ident: split: model 'ident' version '7' is not ready" in done.stderr
