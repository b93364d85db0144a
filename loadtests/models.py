"""The benchmark model and the messages that carry it, defined once for every figure in loadtests/.

Floors and gateway are only comparable if they run the same model on the same bytes: a 32-feature
MLP (Gemm 32x64 -> Relu -> Gemm 64x16) with fixed weights (seed 0), small enough that transport and
framework costs dominate, which is what the performance budget is about. A numpy forward pass of the
same weights gives the expected answer, so a response can be checked without trusting onnxruntime.
Further versions (`mlp/2`, for routing benchmarks) have the same shape and cost with other weights
(seed = version - 1), so an answer also tells which version computed it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from gateway.datatypes import BY_V2_NAME
from gateway.protocol import inference as pb
from gateway.servicer import PLATFORM

MODEL_NAME = "mlp"
MODEL_VERSION = "1"
MODEL_FILE = "model.onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "output"
FEATURES, HIDDEN, OUTPUTS = 32, 64, 16
MAX_BATCH_SIZE = 64  # what the floors report to perf_analyzer (the gateway's default)
OPSET = 17
IR_VERSION = 9  # old enough for any onnxruntime the gateway supports (>= 1.19)


@dataclass(frozen=True)
class MlpWeights:
    w1: np.ndarray  # [FEATURES, HIDDEN]
    b1: np.ndarray  # [HIDDEN]
    w2: np.ndarray  # [HIDDEN, OUTPUTS]
    b2: np.ndarray  # [OUTPUTS]


def version_seed(version: str) -> int:
    """The weights' seed of a model version: 0 for version 1 (the benchmark model), 1 for version 2, ..."""
    return int(version) - 1


def mlp_weights(seed: int = 0) -> MlpWeights:
    rng = np.random.default_rng(seed)

    def layer(fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
        weight = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
        bias = rng.standard_normal(fan_out) * 0.1
        return weight.astype(np.float32), bias.astype(np.float32)

    w1, b1 = layer(FEATURES, HIDDEN)
    w2, b2 = layer(HIDDEN, OUTPUTS)
    return MlpWeights(w1, b1, w2, b2)


def build_mlp(seed: int = 0) -> onnx.ModelProto:
    w = mlp_weights(seed)
    initializers = [
        numpy_helper.from_array(array, name) for name, array in (("w1", w.w1), ("b1", w.b1), ("w2", w.w2), ("b2", w.b2))
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", [INPUT_NAME, "w1", "b1"], ["hidden"]),
            helper.make_node("Relu", ["hidden"], ["activated"]),
            helper.make_node("Gemm", ["activated", "w2", "b2"], [OUTPUT_NAME]),
        ],
        "mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", OUTPUTS])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def build_repository(root: Path | None = None, versions: Iterable[str] = (MODEL_VERSION,)) -> Path:
    """Write `<root>/mlp/<version>/model.onnx` for each version (default: only version 1; root: a new
    temporary directory by default); return root."""
    root = Path(tempfile.mkdtemp(prefix="loadtests-repo-")) if root is None else root
    for version in versions:
        version_dir = root / MODEL_NAME / version
        version_dir.mkdir(parents=True, exist_ok=True)
        onnx.save(build_mlp(version_seed(version)), version_dir / MODEL_FILE)
    return root


def model_path(repository: Path) -> Path:
    return repository / MODEL_NAME / MODEL_VERSION / MODEL_FILE


def open_session(path: Path) -> ort.InferenceSession:
    """A session configured as gateway/runtime.py configures its own, so floors pay the same model cost."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def sample_input(batch: int = 1) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((batch, FEATURES)).astype(np.float32)


def reference_output(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The MLP in numpy: what every server must answer for `x` (with the weights of `seed`)."""
    w = mlp_weights(seed)
    hidden = np.maximum(x @ w.w1 + w.b1, 0.0)
    return (hidden @ w.w2 + w.b2).astype(np.float32)


def build_infer_request(batch: int = 1, model_name: str = MODEL_NAME) -> bytes:
    """A serialized ModelInferRequest for `sample_input(batch)`, sent as raw_input_contents."""
    x = sample_input(batch)
    request = pb.ModelInferRequest(model_name=model_name)
    request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def build_infer_response(output: np.ndarray, model_name: str, model_version: str, id: str) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=id)
    response.outputs.add(name=OUTPUT_NAME, datatype="FP32", shape=output.shape)
    response.raw_output_contents.append(output.tobytes())
    return response


def metadata_answers() -> dict[str, bytes]:
    """ServerMetadata, ModelMetadata and ModelConfig replies describing the benchmark MLP, serialized:
    what Triton's perf_analyzer asks before it sends ModelInfer, so the floor servers can be driven by it."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    fp32 = BY_V2_NAME["FP32"].triton_enum
    config = pb.ModelConfig(
        name=MODEL_NAME,
        platform=PLATFORM,
        max_batch_size=MAX_BATCH_SIZE,
        input=[pb.ModelInput(name=INPUT_NAME, data_type=fp32, dims=[FEATURES])],
        output=[pb.ModelOutput(name=OUTPUT_NAME, data_type=fp32, dims=[OUTPUTS])],
    )
    replies = {
        "ServerMetadata": pb.ServerMetadataResponse(name="floor", version="0"),
        "ModelMetadata": pb.ModelMetadataResponse(
            name=MODEL_NAME,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=[tensor(name=INPUT_NAME, datatype="FP32", shape=[-1, FEATURES])],
            outputs=[tensor(name=OUTPUT_NAME, datatype="FP32", shape=[-1, OUTPUTS])],
        ),
        "ModelConfig": pb.ModelConfigResponse(config=config),
    }
    return {name: reply.SerializeToString() for name, reply in replies.items()}


def _carries(response: pb.ModelInferResponse, expected: np.ndarray) -> bool:
    if len(response.outputs) != 1 or len(response.raw_output_contents) != 1:
        return False
    raw = response.raw_output_contents[0]
    if tuple(response.outputs[0].shape) != expected.shape or len(raw) != expected.nbytes:
        return False
    output = np.frombuffer(raw, dtype=np.float32).reshape(expected.shape)
    # Batched execution may reorder float sums, so compare with a tolerance rather than bytes.
    return bool(np.allclose(output, expected, rtol=1e-4, atol=1e-5))


class OutputCheck:
    """Does a serialized ModelInferResponse carry the expected output (of version 1)? Picklable, so
    load-generator processes can receive it."""

    def __init__(self, batch: int = 1) -> None:
        self.expected = reference_output(sample_input(batch))

    def __call__(self, body: bytes) -> bool:
        return _carries(pb.ModelInferResponse.FromString(body), self.expected)


class VersionedOutputCheck:
    """Does a serialized ModelInferResponse carry the output of the version it names in `model_version`
    (one of `versions`)? For repositories with several versions, where routing picks the version."""

    def __init__(self, versions: Iterable[str], batch: int = 1) -> None:
        x = sample_input(batch)
        self.expected = {v: reference_output(x, version_seed(v)) for v in versions}

    def __call__(self, body: bytes) -> bool:
        response = pb.ModelInferResponse.FromString(body)
        expected = self.expected.get(response.model_version)
        return expected is not None and _carries(response, expected)
