"""Tensor data types: Open Inference Protocol names, numpy dtypes, onnxruntime and Triton enums."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class DataType(NamedTuple):
    v2_name: str  # "FP32", as the protocol spells it
    numpy: np.dtype
    onnx_type: str  # onnxruntime's NodeArg.type, "tensor(float)"
    triton_enum: int  # model_config DataType value
    contents_field: str | None  # InferTensorContents field for typed contents, None if unsupported


_TYPES = [
    DataType("BOOL", np.dtype(np.bool_), "tensor(bool)", 1, "bool_contents"),
    DataType("UINT8", np.dtype(np.uint8), "tensor(uint8)", 2, "uint_contents"),
    DataType("UINT16", np.dtype(np.uint16), "tensor(uint16)", 3, "uint_contents"),
    DataType("UINT32", np.dtype(np.uint32), "tensor(uint32)", 4, "uint_contents"),
    DataType("UINT64", np.dtype(np.uint64), "tensor(uint64)", 5, "uint64_contents"),
    DataType("INT8", np.dtype(np.int8), "tensor(int8)", 6, "int_contents"),
    DataType("INT16", np.dtype(np.int16), "tensor(int16)", 7, "int_contents"),
    DataType("INT32", np.dtype(np.int32), "tensor(int32)", 8, "int_contents"),
    DataType("INT64", np.dtype(np.int64), "tensor(int64)", 9, "int64_contents"),
    DataType("FP16", np.dtype(np.float16), "tensor(float16)", 10, None),
    DataType("FP32", np.dtype(np.float32), "tensor(float)", 11, "fp32_contents"),
    DataType("FP64", np.dtype(np.float64), "tensor(double)", 12, "fp64_contents"),
]

BY_V2_NAME = {t.v2_name: t for t in _TYPES}
BY_ONNX_TYPE = {t.onnx_type: t for t in _TYPES}
BY_NUMPY = {t.numpy: t for t in _TYPES}
