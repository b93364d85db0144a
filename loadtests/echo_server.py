"""Floor (b), the transport's cost: a bare grpc.aio server whose ModelInfer returns fixed bytes.

It answers every call with the pre-serialized ModelInferResponse a real server would send for the
benchmark request, with serializers bypassed, so its throughput is what grpc.aio on one core can carry
for this payload before any protobuf or model work. Nothing a V2 server does can beat it.
Its ModelStreamInfer answers each streamed request the same way (with the request's id): the
streaming floor.

    python loadtests/echo_server.py --port 8001 --cpu 0
"""

from __future__ import annotations

import argparse

import floor_server
import grpc
from models import MODEL_NAME, MODEL_VERSION, build_infer_response, reference_output, sample_input

RESPONSE = build_infer_response(reference_output(sample_input()), MODEL_NAME, MODEL_VERSION, id="")


def model_infer(args: argparse.Namespace) -> grpc.RpcMethodHandler:
    return floor_server.bytes_handler(RESPONSE.SerializeToString())


if __name__ == "__main__":
    floor_server.main(__doc__, model_infer, stream_infer=floor_server.stream_echo_handler(RESPONSE))
