"""Open Inference Protocol messages <-> the core's plain objects, zero-copy where the bytes allow.

`raw_input_contents` becomes numpy arrays with `np.frombuffer` (no copy); typed `contents` are
converted once. Every mistake a client can make in the message raises `InvalidArgument` naming
the field.
"""

from __future__ import annotations

import math

import numpy as np

from gateway.datatypes import BY_V2_NAME, DataType
from gateway.errors import InvalidArgument
from gateway.inference import InferenceRequest, InferenceResponse
from gateway.protocol import inference as pb


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


def decode_request(request: pb.ModelInferRequest) -> InferenceRequest:
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


def encode_response(response: InferenceResponse, message: pb.ModelInferResponse) -> pb.ModelInferResponse:
    """Fill `message` (empty): a fresh one for ModelInfer, the `infer_response` field of a stream's reply."""
    message.model_name = response.model_name
    message.model_version = response.model_version
    message.id = response.id
    parameters = message.parameters
    parameters["request_id"].string_param = response.request_id
    ood = response.ood
    if ood is not None:
        parameters["ood"].bool_param = ood.any_flagged
        parameters["ood_score"].double_param = ood.max_score
        if response.ood_features:
            parameters["ood_features"].string_param = response.ood_features
    outputs = message.outputs
    raw = message.raw_output_contents
    for tensor in response.outputs:
        outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        raw.append(tensor.data)
    return message
