"""`native.logpack` writes a log record's bytes exactly as msgpack does (the reference readers decode)."""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.requestlog.record import (
    FORMAT_VERSION,
    RECORD_FIELDS,
    TENSOR_FIELDS,
    Record,
    Tensor,
    decode,
    encode,
    msgpack_encode,
)
from native.logpack import pack_record


class Status(IntEnum):
    NOT_FOUND = 5


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Integers around every boundary of msgpack's int forms, and texts and bytes around its length forms
edges = [0, 1, 127, 128, 255, 256, 2**15, 2**16 - 1, 2**16, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1]
negative_edges = [-e for e in edges[1:] if e <= 2**63] + [-32, -33]
ints = st.sampled_from(edges + negative_edges) | st.integers(-(2**63), 2**64 - 1)
lengths = st.sampled_from([0, 1, 15, 16, 31, 32, 255, 256, 65535, 65536])
texts = st.text(max_size=40) | lengths.map(lambda n: "é" * (n // 2) + "x" * (n % 2))
blobs = st.binary(max_size=40) | lengths.map(lambda n: b"\x01" * n)
optional_texts = st.none() | texts
tensors = st.lists(st.builds(Tensor, texts, texts, st.lists(st.integers(0, 2**40), max_size=5), blobs), max_size=17)


@st.composite
def records(draw: Any) -> Record:
    record = Record(draw(texts), draw(st.integers(0, 2**64 - 1)), draw(texts), draw(texts))
    record.role, record.status, record.message = draw(texts), draw(ints), draw(texts)
    record.latency_ns = draw(ints)
    record.inputs, record.outputs = draw(tensors), draw(tensors)
    record.primary_id, record.caller, record.routing_key = (
        draw(optional_texts),
        draw(optional_texts),
        draw(optional_texts),
    )
    record.ood_score = draw(st.none() | st.floats())
    record.ood = draw(st.none() | st.booleans())
    record.ood_features, record.trace_id = draw(optional_texts), draw(optional_texts)
    record.sha256 = draw(texts)
    record.raw_request = draw(st.none() | blobs)
    record.segments = draw(st.none() | st.dictionaries(texts, texts, max_size=17))
    record.worker = draw(st.none() | ints)
    return record


@SETTINGS
@given(records())
def test_a_record_is_packed_byte_for_byte_as_msgpack_packs_it(record: Record) -> None:
    data = pack_record(record, RECORD_FIELDS, TENSOR_FIELDS, FORMAT_VERSION)  # natively, not by the fallback
    assert data == msgpack_encode(record) == encode(record)
    assert decode(data).id == record.id


def test_values_only_msgpack_knows_are_packed_by_msgpack() -> None:
    """An int subclass, a memoryview: the native writer declines, the record is still written, the same."""
    record = Record("r1", 1, "m", "1", status=Status.NOT_FOUND)
    record.inputs = [Tensor("x", "FP32", [1], memoryview(b"\0\0\0\0"))]  # type: ignore[arg-type]
    data = encode(record)
    assert data == msgpack_encode(record)
    back = decode(data)
    assert (back.status, back.inputs[0].data) == (5, b"\0\0\0\0")


def test_a_float_subclass_is_packed_natively_as_a_double() -> None:
    record = Record("r1", 1, "m", "1", ood_score=np.float64(2.5))
    assert encode(record) == msgpack_encode(record)
    assert decode(encode(record)).ood_score == 2.5
