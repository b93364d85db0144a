"""OOD scoring on the request path: each policy (flag, reject, fallback) against a real gateway, the
response parameters and the log record, unscored versions, and profiles that cannot be used."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import GatewayProcess
from models import broken_graph, identity_graph, mlp_graph, save_model

from gateway.ood.profile import PROFILE_FILE, build_profile, save_profile
from gateway.protocol import Stub, admin
from gateway.protocol import inference as pb
from gateway.requestlog.reader import LogReader
from gateway.requestlog.record import ROLE_FALLBACK

FEATURES = 32
CONFIG = """
[models.flagged]
ood_policy = "flag"
[models.rejected]
ood_policy = "reject"
[models.fallback]
ood_policy = "fallback"
ood_fallback_version = "1"
"""


def _training(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3000, FEATURES)).astype(np.float32)


def _shifted(rows: int = 1) -> np.ndarray:
    x = np.random.default_rng(99).standard_normal((rows, FEATURES)).astype(np.float32)
    x[:, [3, 7, 11]] += 8.0  # three features far outside training
    return x


def _in_distribution(rows: int = 1) -> np.ndarray:
    return np.random.default_rng(5).standard_normal((rows, FEATURES)).astype(np.float32) * 0.5


@pytest.fixture(scope="module")
def ood_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("ood-models")
    profile = build_profile(_training(), threshold_quantile=0.995)
    for model in ("flagged", "rejected", "fallback", "unscored"):
        for version in ("1", "2"):
            path = save_model(repo, model, version, mlp_graph(seed=int(version)))
            if model != "unscored" and not (model == "fallback" and version == "1"):
                save_profile(profile, path / PROFILE_FILE)
    return repo


@pytest.fixture(scope="module")
def ood_gateway(ood_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(ood_repository, CONFIG, tmp_path_factory.mktemp("ood-gateway"))
    process.wait_ready()
    yield process
    assert process.stop() == 0, process.log


@pytest.fixture
def stub(ood_gateway: GatewayProcess) -> Iterator[Stub]:
    with grpc.insecure_channel(ood_gateway.address) as channel:
        yield Stub(channel)


def _request(model: str, x: np.ndarray, request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def test_flag_answers_and_marks_with_the_furthest_features(stub: Stub, ood_gateway: GatewayProcess) -> None:
    normal = stub.ModelInfer(_request("flagged", _in_distribution(), "flag-normal"), timeout=10)
    assert normal.parameters["ood"].bool_param is False
    assert 0 < normal.parameters["ood_score"].double_param
    assert "ood_features" not in normal.parameters

    odd = stub.ModelInfer(_request("flagged", _shifted(), "flag-odd"), timeout=10)
    assert odd.model_version == "2" and len(odd.raw_output_contents[0]) == 16 * 4
    assert odd.parameters["ood"].bool_param is True
    assert odd.parameters["ood_score"].double_param > normal.parameters["ood_score"].double_param
    named = {item.split("=")[0] for item in odd.parameters["ood_features"].string_param.split(",")}
    assert named == {"x3", "x7", "x11"}

    reader = LogReader(ood_gateway.state_dir / "log")
    (record,) = reader.get("flag-odd")
    assert record.ood is True and record.ood_score == pytest.approx(odd.parameters["ood_score"].double_param)
    assert record.ood_features == odd.parameters["ood_features"].string_param
    (normal_record,) = reader.get("flag-normal")
    assert normal_record.ood is False and normal_record.ood_features is None


def test_a_batch_is_flagged_when_any_row_is(stub: Stub) -> None:
    x = np.concatenate([_in_distribution(3), _shifted(1)])
    response = stub.ModelInfer(_request("flagged", x, "flag-batch"), timeout=10)
    assert response.parameters["ood"].bool_param is True


def test_non_finite_input_is_always_out_of_distribution(stub: Stub) -> None:
    x = _in_distribution()
    x[0, 5] = np.nan
    response = stub.ModelInfer(_request("flagged", x, "flag-nan"), timeout=10)
    assert response.parameters["ood"].bool_param is True
    assert response.parameters["ood_score"].double_param == float("inf")
    assert response.parameters["ood_features"].string_param.startswith("x5=")


def test_reject_refuses_with_score_threshold_and_features(stub: Stub, ood_gateway: GatewayProcess) -> None:
    assert stub.ModelInfer(_request("rejected", _in_distribution(), "reject-normal"), timeout=10).model_version == "2"
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(_request("rejected", _shifted(), "reject-odd"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = refused.value.details()
    assert "inputs[input]: out of distribution" in details and "threshold" in details
    assert "x3=" in details and "x7=" in details
    (record,) = LogReader(ood_gateway.state_dir / "log").get("reject-odd")
    assert record.status == grpc.StatusCode.FAILED_PRECONDITION.value[0] and record.ood is True
    assert record.outputs == []


def test_fallback_answers_from_the_named_version(stub: Stub, ood_gateway: GatewayProcess) -> None:
    normal = stub.ModelInfer(_request("fallback", _in_distribution(), "fallback-normal"), timeout=10)
    assert normal.model_version == "2"
    odd = stub.ModelInfer(_request("fallback", _shifted(), "fallback-odd"), timeout=10)
    assert odd.model_version == "1" and odd.parameters["ood"].bool_param is True
    (record,) = LogReader(ood_gateway.state_dir / "log").get("fallback-odd")
    assert record.role == ROLE_FALLBACK and record.version == "1" and record.ood is True
    assert len(record.outputs) == 1


def test_the_fallback_version_cannot_be_unloaded(stub: Stub, ood_gateway: GatewayProcess) -> None:
    token = (ood_gateway.state_dir / "admin.token").read_text().strip()
    with grpc.insecure_channel(ood_gateway.address) as channel:
        ops = Stub(channel, admin.AdminService)
        with pytest.raises(grpc.RpcError) as error:
            request = admin.UnloadModelRequest(model="fallback", version="1", reason="test")
            ops.UnloadModel(request, metadata=[("authorization", f"Bearer {token}")], timeout=30)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "models.fallback.ood_fallback_version names it" in str(error.value.details())
    assert stub.ModelInfer(_request("fallback", _shifted(), "fallback-kept"), timeout=10).model_version == "1"


def test_a_fallback_that_failed_to_load_answers_unavailable_naming_the_setting(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    save_model(repo, "m", "1", broken_graph())  # its warm-up fails: FAILED
    served = save_model(repo, "m", "2", identity_graph("FP32"))
    save_profile(build_profile(_training()[:, :4]), served / PROFILE_FILE)
    config = '[models.m]\nood_policy = "fallback"\nood_fallback_version = "1"\n'
    gateway = GatewayProcess(repo, config, tmp_path)
    try:
        gateway.wait_ready()
        with grpc.insecure_channel(gateway.address) as channel:
            stub = Stub(channel)
            request = pb.ModelInferRequest(model_name="m", id="far")
            request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
            request.raw_input_contents.append(np.full((1, 4), 50, dtype=np.float32).tobytes())
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(request, timeout=10)
    finally:
        assert gateway.stop() == 0, gateway.log
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    details = str(error.value.details())
    assert "fallback version '1' (models.m.ood_fallback_version) is FAILED" in details, details
    assert "model_version" not in details


def test_a_version_without_profile_is_served_unscored_and_says_so(stub: Stub) -> None:
    response = stub.ModelInfer(_request("unscored", _shifted(), "unscored-1"), timeout=10)
    assert "ood" not in response.parameters and "ood_score" not in response.parameters
    config = stub.ModelConfig(pb.ModelConfigRequest(name="unscored"), timeout=10).config
    assert config.parameters["ood_profile"].string_value == "none"
    scored = stub.ModelConfig(pb.ModelConfigRequest(name="flagged"), timeout=10).config
    assert scored.parameters["ood_profile"].string_value.startswith("32 features, threshold ")
    assert scored.parameters["ood_policy"].string_value == "flag"


def _serve_fails(repository: Path, config: str | None, tmp_path: Path) -> str:
    args = [sys.executable, "-m", "gateway", "serve", "--model-repository", str(repository), "--port", "0"]
    args += ["--state-dir", str(tmp_path / "state")]
    if config is not None:
        (tmp_path / "gateway.toml").write_text(config)
        args += ["--config", str(tmp_path / "gateway.toml")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    return result.stderr


def test_a_corrupt_profile_stops_startup_naming_the_file(tmp_path: Path) -> None:
    path = save_model(tmp_path / "models", "m", "1", mlp_graph()) / PROFILE_FILE
    path.write_bytes(b"not a profile")
    assert f"OOD profile {path}" in _serve_fails(tmp_path / "models", None, tmp_path)


def test_a_profile_for_another_shape_stops_startup_naming_the_file(tmp_path: Path) -> None:
    path = save_model(tmp_path / "models", "m", "1", mlp_graph()) / PROFILE_FILE
    save_profile(build_profile(_training()[:, :10]), path)
    stderr = _serve_fails(tmp_path / "models", None, tmp_path)
    assert f"OOD profile {path} has 10 features but the model's input has 32" in stderr


def test_fallback_to_a_missing_version_stops_startup(tmp_path: Path) -> None:
    save_model(tmp_path / "models", "m", "1", mlp_graph())
    config = '[models.m]\nood_policy = "fallback"\nood_fallback_version = "7"\n'
    assert "models.m.ood_fallback_version: '7' is not a version" in _serve_fails(tmp_path / "models", config, tmp_path)
