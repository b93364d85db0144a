"""`native.wire` against protobuf and the reference decoder (`codec.decode_message`), field by field.

The native reader may only recognise requests: for any bytes at all, it either declines (None, and the
reference decides) or returns exactly what protobuf plus the reference make of them. The common request
(what tritonclient and perf_analyzer send) must take the native path. The native writer's bytes must
parse, with protobuf, into the reply the protocol describes.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.codec import ParameterReader, decode, decode_message, encode
from gateway.datatypes import BY_V2_NAME
from gateway.errors import InvalidArgument
from gateway.inference import InferenceRequest, InferenceResponse
from gateway.ood.scoring import OodResult
from gateway.protocol import inference as pb
from gateway.requestlog.record import Tensor
from native.wire import decode_infer_request

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4)


PARAMETER_VALUES = {
    "bool_param": st.booleans(),
    "int64_param": st.integers(-(2**63), 2**63 - 1),
    "uint64_param": st.integers(0, 2**64 - 1),
    "double_param": st.floats(),
    "string_param": names,
}


@st.composite
def common_requests(draw: Any) -> pb.ModelInferRequest:
    """Well-formed requests of the kind clients send: raw contents, request parameters of every kind."""
    request = pb.ModelInferRequest(model_name=draw(names.filter(bool)), model_version=draw(names), id=draw(names))
    for key in draw(st.lists(names, max_size=3, unique=True)):
        kind = draw(st.sampled_from([None, *PARAMETER_VALUES]))
        if kind is None:
            request.parameters[key].SetInParent()  # an entry with no value set
        else:
            setattr(request.parameters[key], kind, draw(PARAMETER_VALUES[kind]))
    for name in draw(st.lists(names, min_size=1, max_size=3, unique=True)):
        datatype = draw(st.sampled_from(sorted(BY_V2_NAME)))
        shape = draw(shapes)
        size = int(np.prod(shape, dtype=np.int64)) * BY_V2_NAME[datatype].numpy.itemsize
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(draw(st.binary(min_size=size, max_size=size)))
    for name in draw(st.lists(names, max_size=2)):
        request.outputs.add(name=name)
    return request


def reference_of(message: pb.ModelInferRequest) -> InferenceRequest:
    """What protobuf and the reference decoder make of a message, parameters included."""
    request = decode_message(message)
    request.parameter = ParameterReader(message)
    return request


def native_of(data: bytes) -> InferenceRequest:
    """`decode` of bytes the native reader accepts (asserted)."""
    assert decode_infer_request(data) is not None
    return decode(data)


def assert_same(native: InferenceRequest, reference: InferenceRequest) -> None:
    assert (native.model_name, native.model_version, native.id) == (
        reference.model_name,
        reference.model_version,
        reference.id,
    )
    assert native.outputs == reference.outputs
    assert native.datatypes == reference.datatypes
    assert list(native.inputs) == list(reference.inputs)
    for name, array in reference.inputs.items():
        got = native.inputs[name]
        assert (got.dtype, got.shape, got.tobytes()) == (array.dtype, array.shape, array.tobytes())
    assert sorted(native.parameter.names()) == sorted(reference.parameter.names())
    for name in reference.parameter.names():
        assert native.parameter(name) == reference.parameter(name), name


@SETTINGS
@given(common_requests())
def test_the_common_request_is_read_natively_and_as_the_reference_reads_it(request: pb.ModelInferRequest) -> None:
    assert_same(native_of(request.SerializeToString()), reference_of(request))


def test_perf_analyzers_request_is_read_natively() -> None:
    """What Triton's perf_analyzer sends: a bool request parameter and the output it wants by name."""
    request = pb.ModelInferRequest(model_name="mlp")
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    request.inputs.add(name="input", datatype="FP32", shape=[1, 2])
    request.outputs.add(name="output")
    request.raw_input_contents.append(np.array([[1, 2]], np.float32).tobytes())
    native = native_of(request.SerializeToString())
    assert native.parameter("triton_enable_empty_final_response") == "True" and native.outputs == ["output"]
    assert_same(native, reference_of(request))


def _tag(field: int, wire: int) -> bytes:
    return bytes([field << 3 | wire])


def _len(field: int, payload: bytes) -> bytes:
    assert len(payload) < 128
    return _tag(field, 2) + bytes([len(payload)]) + payload


def test_unpacked_shapes_are_read_as_protobuf_reads_them() -> None:
    tensor = _len(1, b"x") + _len(2, b"FP32") + _tag(3, 0) + b"\x01" + _tag(3, 0) + b"\x02"
    data = _len(1, b"m") + _len(5, tensor) + _len(7, struct.pack("<2f", 1.5, -2.0))
    native = native_of(data)
    assert_same(native, reference_of(pb.ModelInferRequest.FromString(data)))
    assert native.inputs["x"].shape == (1, 2)


def _common() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id="r1")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(np.array([[1, 2]], np.float32).tobytes())
    return request


def _with(change: Any) -> bytes:
    request = _common()
    change(request)
    return bytes(request.SerializeToString())


def _parameter(key: bytes, value: bytes) -> bytes:
    """A request `parameters` map entry, hand-encoded: what protobuf's API cannot write."""
    return _len(4, _len(1, key) + _len(2, value))


DECLINED = {
    "a parameter named twice": _with(lambda r: None) + _parameter(b"p", _tag(1, 0) + b"\x01") * 2,
    "a parameter with two values": _with(lambda r: None)
    + _parameter(b"p", _tag(1, 0) + b"\x01" + _tag(2, 0) + b"\x02"),
    "a parameter of an unknown kind": _with(lambda r: None) + _parameter(b"p", _tag(6, 0) + b"\x01"),
    "a parameter's value of the wrong wire type": _with(lambda r: None) + _parameter(b"p", _len(1, b"\x01")),
    "a parameter's name that is not UTF-8": _with(lambda r: None) + _parameter(b"\xff", _tag(1, 0) + b"\x01"),
    "a truncated double parameter": _with(lambda r: None) + _parameter(b"p", _tag(4, 1) + b"\0" * 7),
    "input parameters": _with(lambda r: r.inputs[0].parameters["p"].__setattr__("bool_param", True)),
    "output parameters": _with(lambda r: r.outputs.add(name="y").parameters["p"].__setattr__("int64_param", 1)),
    "typed contents": _with(
        lambda r: (r.ClearField("raw_input_contents"), r.inputs[0].contents.fp32_contents.extend([1, 2]))
    ),
    "no model name": _with(lambda r: r.ClearField("model_name")),
    "no inputs": _with(lambda r: (r.ClearField("inputs"), r.ClearField("raw_input_contents"))),
    "raw count mismatch": _with(lambda r: r.raw_input_contents.append(b"")),
    "byte count mismatch": _with(lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 7)),
    "unknown datatype": _with(lambda r: r.inputs[0].__setattr__("datatype", "FP8")),
    "negative dimension": _with(lambda r: r.inputs[0].shape.__setitem__(0, -1)),
    "input given twice": _with(
        lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[1, 2]), r.raw_input_contents.append(b"\0" * 8))
    ),
    "a shape numpy cannot hold": _with(
        lambda r: (
            r.inputs[0].ClearField("shape"),
            r.inputs[0].shape.extend([0, 2**40, 2**40]),
            r.raw_input_contents.__setitem__(0, b""),
        )
    ),
    "a shape deeper than 32 dimensions": _with(
        lambda r: (
            r.inputs[0].ClearField("shape"),
            r.inputs[0].shape.extend([1] * 33),
            r.raw_input_contents.__setitem__(0, b"\0" * 4),
        )
    ),
    "an unknown field": _with(lambda r: None) + _tag(15, 0) + b"\x01",
    "invalid UTF-8 in a name": _len(1, b"\xff\xfe") + _with(lambda r: None)[3:],
    "truncated": _with(lambda r: None)[:-3],
    # upb reads a tag or a length in at most 5 bytes (and 32 bits): longer ones are corrupt, not padding
    "a 6-byte tag": b"\x8a\x80\x80\x80\x80\x00\x01m" + _with(lambda r: r.ClearField("model_name")),
    "a 6-byte length": b"\x0a\x81\x80\x80\x80\x80\x00m" + _with(lambda r: r.ClearField("model_name")),
    "a 6-byte length in an input": b"\x0a\x01m*\x11\x0a\x01x\x12\x04INT8\x1a\x81\x80\x80\x80\x80\x00\x01:\x01\x07",
}


@pytest.mark.parametrize("data", DECLINED.values(), ids=DECLINED.keys())
def test_anything_uncommon_is_left_to_the_reference(data: bytes) -> None:
    assert decode_infer_request(data) is None
    try:
        reference: InferenceRequest | None = decode(data)
    except InvalidArgument:
        reference = None  # refused, with the reference's message
    if reference is not None:
        assert reference.model_name == "m"


@pytest.mark.parametrize("name", ["a 6-byte tag", "a 6-byte length", "a 6-byte length in an input"])
def test_overlong_tags_and_lengths_are_refused_as_protobuf_refuses_them(name: str) -> None:
    with pytest.raises(InvalidArgument, match="not a valid ModelInferRequest"):
        decode(DECLINED[name])


def test_the_writer_reads_each_output_once() -> None:
    class Shifty:
        name, datatype, reads = "y", "FP32", 0

        @property
        def shape(self) -> Any:
            return iter([1])  # an iterator: a second pass would see nothing

        @property
        def data(self) -> bytes:
            self.reads += 1
            return b"abcd" if self.reads == 1 else b"B" * 100_000  # a second read would overflow the buffer

    reply = pb.ModelInferResponse.FromString(
        encode(InferenceResponse("m", "1", "i", "r", [Shifty()]))  # type: ignore[list-item]
    )
    assert list(reply.outputs[0].shape) == [1] and reply.raw_output_contents == [b"abcd"]
    with pytest.raises(TypeError):
        encode(InferenceResponse("m", "1", "i", "r", [Tensor("y", "FP32", [1], None)]))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode(InferenceResponse("m", "1", "i", "r", [Tensor("y", "FP32", [1.5], b"")]))  # type: ignore[list-item]


def test_the_reference_still_names_the_mistake() -> None:
    with pytest.raises(InvalidArgument, match=r"inputs\[x\]: raw_input_contents has 7 bytes"):
        decode(DECLINED["byte count mismatch"])
    with pytest.raises(InvalidArgument, match="not a valid ModelInferRequest"):
        decode(DECLINED["truncated"])
    duplicate = decode(DECLINED["a parameter named twice"])  # protobuf's map keeps the last entry
    assert duplicate.parameter("p") == "True"


@SETTINGS
@given(
    st.binary(max_size=200)
    | common_requests()
    .map(lambda r: r.SerializeToString())
    .flatmap(
        lambda data: st.tuples(st.just(data), st.integers(0, len(data)), st.binary(max_size=4)).map(
            lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]
        )
    )
)
@example(b"\x0a\x01m\x2a\x08\x0a\x01x\x12\x03FP8")
def test_native_reading_of_any_bytes_agrees_with_the_reference_or_declines(data: bytes) -> None:
    fields = decode_infer_request(data)
    if fields is None:
        return
    message = pb.ModelInferRequest.FromString(data)  # must parse: the native reader accepted the bytes
    assert_same(decode(data), reference_of(message))


def _verdict(flagged: bool, score: float) -> OodResult:
    """A scored request with this verdict and score (the reply carries only these)."""
    no_features = np.zeros((1, 0))
    threshold = -np.inf if flagged else np.inf
    return OodResult(np.array([score]), no_features.astype(np.intp), no_features, score, threshold, ())


outputs = st.lists(
    st.tuples(names.filter(bool), st.sampled_from(sorted(BY_V2_NAME)), shapes, st.binary(max_size=16)),
    max_size=3,
)


@SETTINGS
@given(
    names,
    names,
    names,
    names,
    st.none() | st.tuples(st.booleans(), st.floats(allow_nan=False, allow_infinity=False), names),
    outputs,
    st.booleans(),
)
def test_the_reply_parses_into_the_message_the_protocol_describes(
    model: str, version: str, client_id: str, request_id: str, ood: Any, tensors: Any, stream: bool
) -> None:
    response = InferenceResponse(
        model,
        version,
        client_id,
        request_id,
        [Tensor(name, datatype, shape, data) for name, datatype, shape, data in tensors],
        None if ood is None else _verdict(ood[0], ood[1]),
        None if ood is None else ood[2],
    )
    expected = pb.ModelInferResponse(model_name=model, model_version=version, id=client_id)
    expected.parameters["request_id"].string_param = request_id
    if ood is not None:
        expected.parameters["ood"].bool_param = ood[0]
        expected.parameters["ood_score"].double_param = ood[1]
        if ood[2]:
            expected.parameters["ood_features"].string_param = ood[2]
    for name, datatype, shape, data in tensors:
        expected.outputs.add(name=name, datatype=datatype, shape=shape)
        expected.raw_output_contents.append(data)
    data = encode(response, stream=stream)
    if stream:
        reply = pb.ModelStreamInferResponse.FromString(data)
        assert not reply.error_message
        assert reply.infer_response == expected
    else:
        assert pb.ModelInferResponse.FromString(data) == expected
