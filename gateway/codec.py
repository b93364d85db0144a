"""Open Inference Protocol bytes <-> the core's plain objects, zero-copy where the bytes allow.

The request path works on bytes: `native.wire` reads the common request and writes every reply
without protobuf objects. Any other request is parsed by protobuf and decoded by `decode_message`,
the reference: `raw_input_contents` becomes numpy arrays with `np.frombuffer` (no copy), typed
`contents` are converted once, and every mistake a client can make raises `InvalidArgument` naming
the field.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from google.protobuf.message import DecodeError

from gateway.datatypes import BY_V2_NAME, DataType
from gateway.errors import InvalidArgument
from gateway.inference import InferenceRequest, InferenceResponse
from gateway.protocol import inference as pb
from native.wire import decode_infer_request, encode_infer_response


def _datatype(name: str, declared: str) -> DataType:
    dtype = BY_V2_NAME.get(declared)
    if dtype is None:
        raise InvalidArgument(
            f"inputs[{name}].datatype: unsupported datatype {declared!r}; supported: {', '.join(BY_V2_NAME)}"
        )
    return dtype


def _shape(name: str, shape: list[int]) -> tuple[int, ...]:
    if shape and min(shape) < 0:
        raise InvalidArgument(f"inputs[{name}].shape: negative dimension in {list(shape)}")
    return tuple(shape)


def _reshape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    # The element count matched, yet numpy can refuse the shape: more dimensions than it supports (64),
    # or an empty array whose other dimensions multiply past its size limit ([0, 2**62, 2**62]).
    try:
        return array.reshape(shape)
    except ValueError as e:
        raise InvalidArgument(f"inputs[{name}].shape: {list(shape)} cannot be an array: {e}") from None


def _from_raw(name: str, dtype: DataType, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    expected = math.prod(shape) * dtype.numpy.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"inputs[{name}]: raw_input_contents has {len(raw)} bytes, but shape {list(shape)} "
            f"of {dtype.v2_name} needs {expected}"
        )
    return _reshape(name, np.frombuffer(raw, dtype=dtype.numpy), shape)


def _from_contents(name: str, dtype: DataType, shape: tuple[int, ...], contents: pb.InferTensorContents) -> np.ndarray:
    if dtype.contents_field is None:
        raise InvalidArgument(
            f"inputs[{name}].contents: {dtype.v2_name} cannot be sent as typed contents; use raw_input_contents"
        )
    values = getattr(contents, dtype.contents_field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(
            f"inputs[{name}].contents.{dtype.contents_field}: has {len(values)} values, "
            f"but shape {list(shape)} needs {count}"
        )
    try:
        # A list, not protobuf's container: numpy casts the container without its bounds check, so 200 sent
        # as INT8 (in a 32-bit field) ran the model on -56.
        array = np.asarray(list(values), dtype=dtype.numpy)
    except OverflowError:
        raise InvalidArgument(f"inputs[{name}].contents: a value does not fit {dtype.v2_name}") from None
    return _reshape(name, array, shape)


def decode_message(request: pb.ModelInferRequest) -> InferenceRequest:
    if not request.model_name:
        raise InvalidArgument("model_name: required")
    tensors = request.inputs
    if not tensors:
        raise InvalidArgument("inputs: the request has no inputs")
    raw = request.raw_input_contents
    if raw and len(raw) != len(tensors):
        raise InvalidArgument(
            f"raw_input_contents: has {len(raw)} entries for {len(tensors)} inputs; they must match one to one"
        )
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for i, tensor in enumerate(tensors):
        name = tensor.name
        if name in inputs:
            raise InvalidArgument(f"inputs[{name}]: input given twice")
        dtype = _datatype(name, tensor.datatype)
        shape = _shape(name, tensor.shape)
        has_contents = tensor.HasField("contents")
        if raw:
            if has_contents:
                raise InvalidArgument(
                    f"inputs[{name}]: both raw_input_contents and contents are set; send one or the other"
                )
            inputs[name] = _from_raw(name, dtype, shape, raw[i])
        elif has_contents:
            inputs[name] = _from_contents(name, dtype, shape, tensor.contents)
        else:
            raise InvalidArgument(f"inputs[{name}]: no data (neither raw_input_contents nor contents)")
        datatypes[name] = tensor.datatype
    return InferenceRequest(
        request.model_name,
        request.model_version,
        request.id,
        inputs,
        [o.name for o in request.outputs],
        datatypes,
    )


class ParameterReader:
    """A request's parameters as text, read from the message only when asked (a sticky key or segments
    may need them): the reference for what the native reader makes of them (`ParameterTexts`)."""

    __slots__ = ("_parameters",)

    def __init__(self, request: pb.ModelInferRequest) -> None:
        self._parameters = request.parameters

    def __call__(self, name: str) -> str | None:
        if name not in self._parameters:
            return None
        parameter = self._parameters[name]
        kind = parameter.WhichOneof("parameter_choice")
        return None if kind is None else str(getattr(parameter, kind))

    def names(self) -> Iterable[str]:
        return iter(self._parameters)


class ParameterTexts:
    """A request's parameters as the native reader read them: name -> text (None: no value set)."""

    __slots__ = ("_texts",)

    def __init__(self, texts: dict[str, str | None]) -> None:
        self._texts = texts

    def __call__(self, name: str) -> str | None:
        return self._texts.get(name)

    def names(self) -> Iterable[str]:
        return iter(self._texts)


def decode(data: bytes) -> InferenceRequest:
    """A ModelInferRequest's bytes as the core's request (InvalidArgument naming the field if it is wrong)."""
    fields = decode_infer_request(data)
    if fields is not None:  # the common request, parameters (perf_analyzer sends one) read as text
        model_name, model_version, request_id, inputs, outputs, datatypes, texts = fields
        parameter = ParameterTexts(texts) if texts is not None else None
        return InferenceRequest(model_name, model_version, request_id, inputs, outputs, datatypes, parameter=parameter)
    try:
        message = pb.ModelInferRequest.FromString(data)
    except DecodeError as e:
        raise InvalidArgument(f"request: not a valid ModelInferRequest message: {e}") from None
    request = decode_message(message)
    request.parameter = ParameterReader(message)
    return request


def named(data: bytes) -> tuple[str, str, str]:
    """The model, version and id a request names, for the record of a refused one (none if it does not parse)."""
    try:
        message = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return "", "", ""
    return message.model_name, message.model_version, message.id


def encode(response: InferenceResponse, stream: bool = False) -> bytes:
    """The ModelInferResponse's bytes (a ModelStreamInferResponse's with `stream`): the answering version,
    the client's id, the log's `request_id`, the OOD verdict where scored, and the outputs as raw bytes."""
    ood = response.ood
    return encode_infer_response(
        response.model_name,
        response.model_version,
        response.id,
        response.request_id,
        None if ood is None else ood.any_flagged,
        0.0 if ood is None else ood.max_score,
        response.ood_features or "",
        response.outputs,
        stream,
    )
