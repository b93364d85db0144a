"""Type stub of the compiled `native.wire` (see wire.pyx; reference: gateway.codec.decode_message)."""

from collections.abc import Sequence
from typing import Protocol

import numpy as np

class _Tensor(Protocol):
    name: str
    datatype: str
    shape: list[int]
    data: bytes

def decode_infer_request(
    data: bytes,
) -> tuple[str, str, str, dict[str, np.ndarray], list[str], dict[str, str], dict[str, str | None] | None] | None: ...
def encode_infer_response(
    model_name: str,
    model_version: str,
    id: str,
    request_id: str,
    ood_flagged: bool | None,
    ood_score: float,
    ood_features: str,
    outputs: Sequence[_Tensor],
    stream: bool = False,
) -> bytes: ...
