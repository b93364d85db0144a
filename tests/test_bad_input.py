"""Every client mistake gets a precise status code and a message naming the offending field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import GatewayProcess
from models import save_model
from onnx import TensorProto, helper

from gateway.protocol import Stub
from gateway.protocol import inference as pb


def _request(model: str = "mlp", shape: tuple[int, ...] = (1, 32), datatype: str = "FP32", **kwargs: str) -> object:
    request = pb.ModelInferRequest(model_name=model, **kwargs)
    request.inputs.add(name="input", datatype=datatype, shape=shape)
    count = int(np.prod(shape))
    itemsize = {"FP32": 4, "FP64": 8, "INT64": 8, "FP16": 2}.get(datatype, 4)
    request.raw_input_contents.append(b"\0" * (count * itemsize))
    return request


def _mutate(change: Callable[[object], None], **kwargs: str) -> object:
    request = _request(**kwargs)
    change(request)
    return request


def _set_raw(request: object, data: bytes) -> None:
    request.raw_input_contents[0] = data  # type: ignore[attr-defined]


def _add_extra_input(request: object) -> None:
    request.inputs.add(name="extra", datatype="FP32", shape=[1, 1])  # type: ignore[attr-defined]
    request.raw_input_contents.append(b"\0" * 4)  # type: ignore[attr-defined]


def _rename_input(request: object) -> None:
    request.inputs[0].name = "features"  # type: ignore[attr-defined]


def _typed_and_raw(request: object) -> None:
    request.inputs[0].contents.fp32_contents.extend([0.0] * 32)  # type: ignore[attr-defined]


def _no_data(request: object) -> None:
    del request.raw_input_contents[:]  # type: ignore[attr-defined]


def _short_typed(request: object) -> None:
    del request.raw_input_contents[:]  # type: ignore[attr-defined]
    request.inputs[0].contents.fp32_contents.extend([0.0] * 3)  # type: ignore[attr-defined]


def _nan(request: object) -> None:
    _set_raw(request, np.full((1, 32), np.nan, dtype=np.float32).tobytes())


def _unknown_output(request: object) -> None:
    request.outputs.add(name="logits")  # type: ignore[attr-defined]


def _duplicate_input(request: object) -> None:
    request.inputs.add(name="input", datatype="FP32", shape=[1, 32])  # type: ignore[attr-defined]
    request.raw_input_contents.append(b"\0" * 128)  # type: ignore[attr-defined]


CASES = [
    ("unknown model", _request(model="nope"), grpc.StatusCode.NOT_FOUND, "model_name: unknown model 'nope'"),
    (
        "unknown version",
        _request(model_version="9"),
        grpc.StatusCode.NOT_FOUND,
        "model_version: model 'mlp' has no version '9'",
    ),
    ("missing model name", _request(model=""), grpc.StatusCode.INVALID_ARGUMENT, "model_name: required"),
    ("missing input", _mutate(_rename_input), grpc.StatusCode.INVALID_ARGUMENT, "missing input 'input'"),
    ("extra input", _mutate(_add_extra_input), grpc.StatusCode.INVALID_ARGUMENT, "unexpected input 'extra'"),
    (
        "duplicate input",
        _mutate(_duplicate_input),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[input]: input given twice",
    ),
    (
        "wrong dtype",
        _request(datatype="FP64"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[input].datatype: FP64 does not match the model's FP32",
    ),
    (
        "unsupported dtype",
        _request(datatype="BYTES"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[input].datatype: unsupported datatype 'BYTES'",
    ),
    ("wrong rank", _request(shape=(32,)), grpc.StatusCode.INVALID_ARGUMENT, "inputs[input].shape: [32] has rank 1"),
    (
        "wrong width",
        _request(shape=(1, 31)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[input].shape: dimension 1 is 31, the model expects 32",
    ),
    (
        "negative dim",
        _request(shape=(-1, 32)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[input].shape: negative dimension",
    ),
    (
        "rank numpy cannot make",
        _request(shape=(0,) * 70),
        grpc.StatusCode.INVALID_ARGUMENT,
        "0, 0] cannot be an array: maximum supported dimension",
    ),
    (
        "byte length",
        _mutate(lambda r: _set_raw(r, b"\0" * 127)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[input]: raw_input_contents has 127 bytes, but shape [1, 32] of FP32 needs 128",
    ),
    (
        "raw and typed",
        _mutate(_typed_and_raw),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[input]: both raw_input_contents and contents are set",
    ),
    ("no data", _mutate(_no_data), grpc.StatusCode.INVALID_ARGUMENT, "inputs[input]: no data"),
    (
        "typed count",
        _mutate(_short_typed),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[input].contents.fp32_contents: has 3 values, but shape [1, 32] needs 32",
    ),
    ("empty batch", _request(shape=(0, 32)), grpc.StatusCode.INVALID_ARGUMENT, "inputs: empty batch"),
    (
        "batch too big",
        _request(shape=(9, 32)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs: batch size 9 exceeds max_batch_size 8",
    ),
    ("nan forbidden", _mutate(_nan), grpc.StatusCode.INVALID_ARGUMENT, "inputs[input]: contains NaN or Inf"),
    ("unknown output", _mutate(_unknown_output), grpc.StatusCode.INVALID_ARGUMENT, "outputs: unknown output 'logits'"),
]


@pytest.mark.parametrize(("case", "request_", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_precisely(
    stub: Stub, case: str, request_: object, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request_)
    assert error.value.code() == code, error.value.details()
    assert message in error.value.details()


def test_no_inputs(stub: Stub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(pb.ModelInferRequest(model_name="mlp"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs: the request has no inputs" in error.value.details()


def test_raw_count_mismatch(stub: Stub) -> None:
    request = _request()
    request.raw_input_contents.append(b"")  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request)
    assert "raw_input_contents: has 2 entries for 1 inputs" in error.value.details()


def test_nan_allowed_where_policy_allows(stub: Stub) -> None:
    request = pb.ModelInferRequest(model_name="identity_fp32")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.full((1, 4), np.inf, dtype=np.float32).tobytes())
    response = stub.ModelInfer(request)
    assert np.isinf(np.frombuffer(response.raw_output_contents[0], dtype=np.float32)).all()


def test_oversized_message_is_resource_exhausted(repository: object, tmp_path: object) -> None:
    gateway = GatewayProcess(repository, "[server]\nmax_message_bytes = 4096\n", tmp_path)  # type: ignore[arg-type]
    try:
        gateway.wait_ready()
        with grpc.insecure_channel(gateway.address) as channel:
            with pytest.raises(grpc.RpcError) as error:
                Stub(channel).ModelInfer(_request(shape=(64, 32)))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        assert gateway.stop() == 0


def test_model_execution_error_is_internal_with_onnxruntime_message(stub: Stub) -> None:
    request = pb.ModelInferRequest(model_name="gather")
    request.inputs.add(name="index", datatype="INT64", shape=[1, 1])
    request.raw_input_contents.append(np.array([[7]], dtype=np.int64).tobytes())
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request)
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert "model execution failed" in error.value.details()
    assert "indices" in error.value.details().lower()


def test_metadata_of_unknown_model_is_not_found(stub: Stub) -> None:
    for call, message in ((stub.ModelMetadata, pb.ModelMetadataRequest), (stub.ModelConfig, pb.ModelConfigRequest)):
        with pytest.raises(grpc.RpcError) as error:
            call(message(name="nope"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("datatype", "value"), [("INT8", 200), ("UINT8", 300), ("INT16", -40000), ("UINT16", 70000)])
def test_a_typed_value_that_does_not_fit_its_datatype_is_refused(stub: Stub, datatype: str, value: int) -> None:
    """8- and 16-bit values travel in 32-bit protobuf fields: numpy cast protobuf's container without its
    bounds check, so INT8 200 ran the model on -56 and answered OK."""
    request = pb.ModelInferRequest(model_name=f"identity_{datatype.lower()}")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[1, 4])
    field = tensor.contents.uint_contents if datatype.startswith("U") else tensor.contents.int_contents
    field.extend([1, 2, 3, value])
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == f"inputs[x].contents: a value does not fit {datatype}"


def test_inputs_of_one_request_must_share_their_batch_dimension(tmp_path: Path) -> None:
    """A two-input model: matching batches run (each input read from the request's bytes), differing
    ones are refused naming both sizes."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["z"])],
        "add",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("x", "y")],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])],
    )
    save_model(tmp_path / "models", "add", "1", graph)
    gateway = GatewayProcess(tmp_path / "models", None, tmp_path)
    gateway.wait_ready()
    x, y = np.arange(8, dtype=np.float32).reshape(2, 4), np.full((2, 4), 0.5, np.float32)

    def request(y_rows: int) -> object:
        message = pb.ModelInferRequest(model_name="add")
        for name, array in (("x", x), ("y", y[:y_rows])):
            message.inputs.add(name=name, datatype="FP32", shape=array.shape)
            message.raw_input_contents.append(array.tobytes())
        return message

    try:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = Stub(channel)
            reply = stub.ModelInfer(request(2))
            np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, 4), x + y)
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(request(1))
    finally:
        assert gateway.stop() == 0, gateway.log
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "inputs: batch dimensions differ across inputs: [1, 2]"
