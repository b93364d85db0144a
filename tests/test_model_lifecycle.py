"""Model versions come and go while the gateway serves: load, replace and unload through the admin API,
Triton's repository RPCs and the repository watcher, with refusals that leave serving untouched."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import GatewayProcess
from models import broken_graph, mlp_graph, save_model
from test_admin_cli import as_json, ok

from gateway.protocol import Stub, admin
from gateway.protocol import inference as pb

REASON = "lifecycle test"


def _stage(tmp: Path, name: str, version: str, graph: object) -> Path:
    """Build a version directory outside the repository (moved in whole, as an operator should)."""
    return save_model(tmp / "staging", name, version, graph)  # type: ignore[arg-type]


def _move_in(staged: Path, repository: Path) -> None:
    target = repository / staged.parent.name / staged.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staged), str(target))


class Admin:
    def __init__(self, gateway: GatewayProcess) -> None:
        self.channel = grpc.insecure_channel(gateway.address)
        self.stub = Stub(self.channel, admin.AdminService)
        token = (gateway.state_dir / "admin.token").read_text().strip()
        self.metadata = [("authorization", f"Bearer {token}")]

    def load(self, model: str, version: str, **flags: bool) -> object:
        request = admin.LoadModelRequest(model=model, version=version, reason=REASON, **flags)
        return self.stub.LoadModel(request, metadata=self.metadata, timeout=60)

    def unload(self, model: str, version: str) -> object:
        request = admin.UnloadModelRequest(model=model, version=version, reason=REASON)
        return self.stub.UnloadModel(request, metadata=self.metadata, timeout=60)

    def split(self, model: str, *shares: tuple[str, int]) -> None:
        split = [admin.VersionShare(version=v, bps=bps) for v, bps in shares]
        request = admin.SetSplitRequest(model=model, split=split, reason=REASON)
        self.stub.SetSplit(request, metadata=self.metadata, timeout=10)

    def versions(self, model: str) -> dict[str, object]:
        response = self.stub.ListModels(admin.ListModelsRequest(model=model), metadata=self.metadata, timeout=10)
        return {v.version: v for v in response.versions}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Path, Path]]:
    tmp = tmp_path_factory.mktemp("lifecycle")
    repository = tmp / "models"
    save_model(repository, "mlp", "1", mlp_graph(seed=0))
    gateway = GatewayProcess(repository, "[repository]\nwatch_interval_s = 0\n", tmp)
    gateway.wait_ready()
    yield gateway, repository, tmp
    assert gateway.stop() == 0, gateway.log


def _infer(stub: Stub, model: str = "mlp", version: str = "", seed: int = 0) -> pb.ModelInferResponse:
    x = np.random.default_rng(seed).standard_normal((1, 32)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 32])
    request.raw_input_contents.append(x.tobytes())
    response: pb.ModelInferResponse = stub.ModelInfer(request, timeout=10)
    return response


def test_load_unload_churn_under_load_fails_no_request(live: tuple[GatewayProcess, Path, Path]) -> None:
    gateway, repository, tmp = live
    ops = Admin(gateway)
    ops.split("mlp", ("1", 10000))  # traffic stays on version 1 while 2 comes and goes
    _move_in(_stage(tmp, "mlp", "2", mlp_graph(seed=2)), repository)
    failures: list[str] = []
    answered = 0
    stop = threading.Event()

    def traffic() -> None:
        nonlocal answered
        with grpc.insecure_channel(gateway.address) as channel:
            stub = Stub(channel)
            while not stop.is_set():
                try:
                    assert _infer(stub).model_version == "1"
                    answered += 1
                except (grpc.RpcError, AssertionError) as e:
                    failures.append(repr(e))

    senders = [threading.Thread(target=traffic) for _ in range(4)]
    for sender in senders:
        sender.start()
    try:
        for _ in range(10):  # 20 changes
            loaded = ops.load("mlp", "2")
            assert loaded.version.state == "READY" and loaded.entry.action == "load"  # type: ignore[attr-defined]
            with grpc.insecure_channel(gateway.address) as channel:
                assert _infer(Stub(channel), version="2").model_version == "2"
            unloaded = ops.unload("mlp", "2")
            assert unloaded.entry.action == "unload"  # type: ignore[attr-defined]
    finally:
        stop.set()
        for sender in senders:
            sender.join()
    assert failures == [] and answered > 50
    with grpc.insecure_channel(gateway.address) as channel, pytest.raises(grpc.RpcError) as gone:
        _infer(Stub(channel), version="2")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    history = as_json(gateway, "routes", "history", "mlp")["entries"]
    assert [e["action"] for e in history[-2:]] == ["load", "unload"]
    assert history[-1]["details"]["version"] == "2" and len(history[-1]["details"]["sha256"]) == 64


@pytest.mark.parametrize(
    ("version", "write", "expected"),
    [
        ("5", lambda path: path.write_bytes(b"not an onnx model"), "did not load"),
        ("6", None, "changes the signature of version '1': inputs were input FP32 [-1, 32], now input FP32 [-1, 16]"),
        ("7", None, "did not load"),
        ("8", lambda path: (path.parent / "model.toml").write_bytes(b'owner = "\xff"\n'), "model.toml: 'utf-8' codec"),
    ],
)
def test_a_bad_version_is_refused_and_serving_is_untouched(
    live: tuple[GatewayProcess, Path, Path], version: str, write: object, expected: str
) -> None:
    gateway, repository, tmp = live
    graphs = {"5": mlp_graph(), "6": mlp_graph(features=16), "7": broken_graph(), "8": mlp_graph()}
    staged = _stage(tmp, "mlp", version, graphs[version])
    if callable(write):
        write(staged / "model.onnx")
    _move_in(staged, repository)
    ops = Admin(gateway)
    with pytest.raises(grpc.RpcError) as refused:
        ops.load("mlp", version)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert expected in refused.value.details()
    assert version not in ops.versions("mlp")
    with grpc.insecure_channel(gateway.address) as channel:
        assert _infer(Stub(channel)).model_version == "1"
    shutil.rmtree(repository / "mlp" / version)


def test_a_routed_version_cannot_be_unloaded(live: tuple[GatewayProcess, Path, Path]) -> None:
    gateway, _, _ = live
    ops = Admin(gateway)
    ops.split("mlp", ("1", 10000))
    with pytest.raises(grpc.RpcError) as refused:
        ops.unload("mlp", "1")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "its route's split sends it traffic" in refused.value.details()
    assert ops.versions("mlp")["1"].in_use  # type: ignore[attr-defined]


def test_a_served_version_is_immutable_unless_replaced(live: tuple[GatewayProcess, Path, Path]) -> None:
    gateway, repository, tmp = live
    ops = Admin(gateway)
    _move_in(_stage(tmp, "mlp", "3", mlp_graph(seed=3)), repository)
    first = ops.load("mlp", "3").version.sha256  # type: ignore[attr-defined]
    with grpc.insecure_channel(gateway.address) as channel:
        before = _infer(Stub(channel), version="3").raw_output_contents[0]
    save_model(repository, "mlp", "3", mlp_graph(seed=4))  # the file changes under the same version
    with pytest.raises(grpc.RpcError) as refused:
        ops.load("mlp", "3")
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS and "immutable" in refused.value.details()
    replaced = ops.load("mlp", "3", replace=True)
    assert replaced.entry.action == "replace"  # type: ignore[attr-defined]
    assert '"replaced_sha256": "' + first in replaced.entry.details_json  # type: ignore[attr-defined]
    with grpc.insecure_channel(gateway.address) as channel:
        assert _infer(Stub(channel), version="3").raw_output_contents[0] != before
    ops.unload("mlp", "3")


def test_tritonclient_repository_calls(live: tuple[GatewayProcess, Path, Path]) -> None:
    gateway, repository, tmp = live
    token = (gateway.state_dir / "admin.token").read_text().strip()
    headers = {"authorization": f"Bearer {token}"}
    client = triton.InferenceServerClient(gateway.address)
    _move_in(_stage(tmp, "extra", "1", mlp_graph(seed=9)), repository)
    index = client.get_model_repository_index(headers=headers, as_json=True)
    states = {(m["name"], m.get("version", "")): m.get("state", "") for m in index["models"]}
    assert states[("mlp", "1")] == "READY" and states[("extra", "1")] == "UNAVAILABLE"
    client.load_model("extra", headers=headers)
    assert client.is_model_ready("extra", "1")
    client.unload_model("extra", headers=headers)
    with pytest.raises(triton.InferenceServerException, match="unknown model 'extra'"):
        client.is_model_ready("extra")
    with pytest.raises(triton.InferenceServerException, match="has a route"):
        client.unload_model("mlp", headers=headers)  # routed: refused
    with pytest.raises(triton.InferenceServerException, match="admin token"):
        client.load_model("extra")  # no token


def test_models_list_shows_state_sha_and_use(live: tuple[GatewayProcess, Path, Path]) -> None:
    gateway, _, _ = live
    table = ok(gateway, "models", "list", "mlp")
    assert "READY" in table and "its route's split sends it traffic" in table


def test_a_version_directory_appearing_is_loaded_by_the_watcher(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    save_model(repository, "mlp", "1", mlp_graph(seed=0))
    gateway = GatewayProcess(repository, "[repository]\nwatch_interval_s = 0.2\n", tmp_path)
    try:
        gateway.wait_ready()
        # A version whose model.toml is not UTF-8 fails alone; it used to end the watcher, silently.
        not_utf8 = _stage(tmp_path, "mlp", "2", mlp_graph(seed=2))
        (not_utf8 / "model.toml").write_bytes(b'owner = "\xff"\n')
        _move_in(not_utf8, repository)
        time.sleep(0.5)
        _move_in(_stage(tmp_path, "mlp", "3", mlp_graph(seed=3)), repository)
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(gateway.address) as channel:
            stub = Stub(channel)
            while time.monotonic() < deadline:
                if "3" in stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"), timeout=5).versions:
                    break
                time.sleep(0.1)
            assert _infer(stub).model_version == "3"  # no route: the new highest version serves
        listed = {v["version"]: v for v in as_json(gateway, "models", "list")["versions"]}
        assert listed["2"]["state"] == "FAILED" and "model.toml" in listed["2"]["reason"]
        history = as_json(gateway, "routes", "history", "mlp")["entries"]
        assert history[-1]["who"] == "repository-watch" and history[-1]["action"] == "load"
    finally:
        assert gateway.stop() == 0, gateway.log
