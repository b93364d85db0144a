"""ONNX models the tests build with onnx.helper, written as a model repository."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]

DTYPES = {
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP64": (TensorProto.DOUBLE, np.float64),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16),
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "BOOL": (TensorProto.BOOL, np.bool_),
}


def save_model(repo: Path, name: str, version: str, graph: onnx.GraphProto, toml: str | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = repo / name / version
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.onnx").write_bytes(model.SerializeToString())
    if toml is not None:
        (path / "model.toml").write_text(toml)
    return path


def mlp_graph(features: int = 32, hidden: int = 64, outputs: int = 16, seed: int = 0) -> onnx.GraphProto:
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((features, hidden)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, outputs)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.standard_normal(outputs).astype(np.float32), "b2")
    return helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["output"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", outputs])],
        [w1, b1, w2, b2],
    )


def identity_graph(v2_dtype: str, width: int | str = 4) -> onnx.GraphProto:
    onnx_type, _ = DTYPES[v2_dtype]
    return helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"identity_{v2_dtype}",
        [helper.make_tensor_value_info("x", onnx_type, ["N", width])],
        [helper.make_tensor_value_info("y", onnx_type, ["N", width])],
    )


def two_outputs_graph() -> onnx.GraphProto:
    one = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    return helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["plus_one"]), helper.make_node("Mul", ["x", "two"], ["times_two"])],
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("plus_one", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("times_two", TensorProto.FLOAT, ["N", 4]),
        ],
        [one, two],
    )


def fixed_shape_graph() -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )


def gather_graph() -> onnx.GraphProto:
    """Looks up indices in a table of 5 values: an index out of range fails inside onnxruntime."""
    table = numpy_helper.from_array(np.arange(5, dtype=np.float32) * 10, "table")
    return helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["value"])],
        "gather",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["N", 1])],
        [table],
    )


def heavy_graph(width: int = 64, hidden: int = 2048) -> onnx.GraphProto:
    """Small inputs, milliseconds of compute per batch: keeps many requests in flight cheaply."""
    rng = np.random.default_rng(1)
    weights = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) / 64, f"w{i}")
        for i, shape in enumerate([(width, hidden), (hidden, hidden), (hidden, hidden), (hidden, width)])
    ]
    names = ["x", "h0", "h1", "h2", "y"]
    return helper.make_graph(
        [helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]]) for i in range(4)],
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        weights,
    )


def failing_graph(width: int = 64) -> onnx.GraphProto:
    """Same signature as `heavy_graph`; fails inside onnxruntime when an input value is 5 or more
    (it indexes a 5-entry table with the largest input), so random warm-up inputs pass."""
    table = numpy_helper.from_array(np.zeros(5, dtype=np.float32), "table")
    return helper.make_graph(
        [
            helper.make_node("ReduceMax", ["x"], ["largest"], keepdims=0),
            helper.make_node("Cast", ["largest"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["offset"]),
            helper.make_node("Add", ["x", "offset"], ["y"]),
        ],
        "failing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        [table],
    )


def broken_graph() -> onnx.GraphProto:
    """Loads, but every run fails (a [1, 4] input cannot be reshaped to [3, -1]): warm-up fails."""
    shape = numpy_helper.from_array(np.array([3, -1], dtype=np.int64), "shape")
    return helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, "M"])],
        [shape],
    )


PROVENANCE = """[provenance]
training_commit = "abc123"
data_version = "2026-11-01"
owner = "risk-team"
[metrics]
auc = 0.91
"""


def build_repository(repo: Path) -> Path:
    """The standard test repository: several models covering the protocol's cases."""
    save_model(repo, "mlp", "1", mlp_graph(seed=0), PROVENANCE)
    save_model(repo, "mlp", "2", mlp_graph(seed=1))
    for dtype in DTYPES:
        save_model(repo, f"identity_{dtype.lower()}", "1", identity_graph(dtype))
    save_model(repo, "sequence", "1", identity_graph("FP32", width="S"))
    save_model(repo, "two_outputs", "1", two_outputs_graph())
    save_model(repo, "fixed", "1", fixed_shape_graph())
    save_model(repo, "gather", "1", gather_graph())
    # Memory-bound per row (the weights stream from RAM for every run), cheap per extra row: the
    # case micro-batching is for. The gateway fixture runs one inline and one on a thread.
    for name in ("wide_inline", "wide_thread"):
        save_model(repo, name, "1", heavy_graph())
    # A model with a fast primary, a slow candidate and a broken candidate: shadow tests.
    save_model(repo, "shadowed", "1", identity_graph("FP32", width=64))
    save_model(repo, "shadowed", "2", heavy_graph())
    save_model(repo, "shadowed", "3", failing_graph())
    return repo


def build_heavy_repository(repo: Path) -> Path:
    save_model(repo, "heavy", "1", heavy_graph())
    save_model(repo, "broken", "1", broken_graph())
    return repo


def build_identity_repository(repo: Path) -> Path:
    """One FP32 identity model (`x` → `y`, [N, 4]): a gateway that starts fast, for transport tests."""
    save_model(repo, "identity_fp32", "1", identity_graph("FP32"))
    return repo


def slow_identity_graph(width: int = 64, hidden: int = 2048, repeats: int = 6) -> onnx.GraphProto:
    """Answers exactly what an FP32 identity of `width` answers, after `heavy_graph`'s middle layers run
    `repeats` times (tens of milliseconds: slow enough to show above a loaded machine's noise); their
    result is multiplied by zero and added: a slow candidate that agrees and never fails."""
    heavy = heavy_graph(width, hidden)
    w_in, w_a, w_b, w_out = (w.name for w in heavy.initializer)
    nodes = [helper.make_node("MatMul", ["x", w_in], ["h0"])]
    for r in range(repeats):
        nodes += [
            helper.make_node("MatMul", [f"h{2 * r}", w_a], [f"h{2 * r + 1}"]),
            helper.make_node("MatMul", [f"h{2 * r + 1}", w_b], [f"h{2 * r + 2}"]),
        ]
    zero = numpy_helper.from_array(np.zeros(width, dtype=np.float32), "zero")
    nodes += [
        helper.make_node("MatMul", [f"h{2 * repeats}", w_out], ["heavy"]),
        helper.make_node("Mul", ["heavy", "zero"], ["nothing"]),
        helper.make_node("Add", ["x", "nothing"], ["y"]),
    ]
    return helper.make_graph(
        nodes,
        "slow_identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        [*heavy.initializer, zero],
    )


def scaled_graph(factor: float, width: int = 64) -> onnx.GraphProto:
    """y = factor * x: the FP32 identity's signature with different weights (disagrees on every row)."""
    scale = numpy_helper.from_array(np.array(factor, dtype=np.float32), "scale")
    return helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["y"])],
        "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        [scale],
    )


def classifier_graph(swap: bool = False, north_penalty: float = 0.0) -> onnx.GraphProto:
    """A two-class classifier of x = [a, b, r] (FP32 [N, 3]): `label` (INT64 [N]) is 1 when b > a, else 0.
    `swap` answers the other class (wrong wherever that rule is right); `north_penalty` lowers b's score by
    that much times max(0, r - 0.5), so rows with r > 0.5 (region "north" in the tests) rarely get class 1."""
    pick = np.array([[0.0], [0.0], [1.0]], dtype=np.float32)
    columns = np.array([[0, 1], [1, 0], [0, 0]] if swap else [[1, 0], [0, 1], [0, 0]], dtype=np.float32)
    initializers = [
        numpy_helper.from_array(pick, "pick"),
        numpy_helper.from_array(np.array([-0.5], dtype=np.float32), "half"),
        numpy_helper.from_array(np.array([[0.0, -north_penalty]], dtype=np.float32), "penalty"),
        numpy_helper.from_array(columns, "columns"),
    ]
    return helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "pick"], ["r"]),
            helper.make_node("Add", ["r", "half"], ["r_shifted"]),
            helper.make_node("Relu", ["r_shifted"], ["north"]),
            helper.make_node("MatMul", ["north", "penalty"], ["lowered"]),
            helper.make_node("MatMul", ["x", "columns"], ["scores"]),
            helper.make_node("Add", ["scores", "lowered"], ["logits"]),
            helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])],
        initializers,
    )
