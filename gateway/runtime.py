"""onnxruntime sessions: load a model file, expose its signature, run it, warm it up."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gateway.datatypes import BY_ONNX_TYPE, DataType
from gateway.errors import ConfigError, InvalidArgument, ModelExecutionError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: DataType
    shape: tuple[int, ...]  # -1 for a dynamic dimension, as the protocol reports it


def shape_text(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_input(spec: TensorSpec, array: np.ndarray, declared: str, reject_non_finite: bool) -> None:
    """One input against its spec (datatype, rank, fixed dimensions, NaN/Inf): INVALID_ARGUMENT naming it."""
    if declared != spec.dtype.v2_name:
        raise InvalidArgument(
            f"inputs[{spec.name}].datatype: {declared} does not match the model's {spec.dtype.v2_name}"
        )
    if array.ndim != len(spec.shape):
        raise InvalidArgument(
            f"inputs[{spec.name}].shape: {shape_text(array.shape)} has rank {array.ndim}, "
            f"the model expects rank {len(spec.shape)} {shape_text(spec.shape)}"
        )
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if want != -1 and got != want:
            raise InvalidArgument(
                f"inputs[{spec.name}].shape: dimension {axis} is {got}, the model expects {want} "
                f"(shape {shape_text(spec.shape)})"
            )
    if reject_non_finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidArgument(f"inputs[{spec.name}]: contains NaN or Inf, which model policy rejects")


def _spec(arg: ort.NodeArg, path: Path) -> TensorSpec:
    dtype = BY_ONNX_TYPE.get(arg.type)
    if dtype is None:
        raise ConfigError(f"{path}: tensor {arg.name!r} has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, dtype, shape)


class OnnxModel:
    """One onnxruntime session and its signature. `run` is safe to call from one thread at a time
    per caller; onnxruntime itself allows concurrent runs."""

    def __init__(self, path: Path, intra_op_threads: int, inter_op_threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning worker threads would steal the event loop's core between requests.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise ConfigError(f"{path}: onnxruntime cannot load the model: {e}") from e
        self.inputs = tuple(_spec(a, path) for a in self._session.get_inputs())
        self.outputs = tuple(_spec(a, path) for a in self._session.get_outputs())
        self.input_names = frozenset(i.name for i in self.inputs)
        self.output_names = [o.name for o in self.outputs]
        self.batchable = all(len(t.shape) >= 1 and t.shape[0] == -1 for t in self.inputs + self.outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._session.run(self.output_names, feeds)
        except Exception as e:
            raise ModelExecutionError(f"model execution failed: {e}") from e

    def synthetic_inputs(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Inputs built from the signature alone: dynamic dims are `batch` (first) or 1 (others)."""
        rng = np.random.default_rng(0)
        feeds = {}
        for spec in self.inputs:
            shape = [(batch if i == 0 else 1) if d == -1 else d for i, d in enumerate(spec.shape)]
            feeds[spec.name] = rng.random(shape).astype(spec.dtype.numpy)
        return feeds

    def warm_up(self, runs: int) -> float:
        """Run synthetic inputs `runs` times; return the fastest run in microseconds."""
        feeds = self.synthetic_inputs()
        best = float("inf")
        for _ in range(max(runs, 1)):
            start = time.perf_counter()
            self.run(feeds)
            best = min(best, (time.perf_counter() - start) * 1e6)
        if self.batchable:
            self.run(self.synthetic_inputs(batch=8))  # let the arena grow before traffic does
        return best
