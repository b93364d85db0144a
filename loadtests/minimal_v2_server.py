"""Floor (c), the least a V2 server can do: parse, run the model once, answer; nothing else.

Per request it parses the ModelInferRequest, wraps raw_input_contents with np.frombuffer, makes one
onnxruntime `run` and serializes a ModelInferResponse with raw_output_contents. No validation,
routing, batching or logging: the gap between this and the echo floor is the price of doing the work
at all, and the gap between it and the gateway is what the gateway's features cost.

    python loadtests/minimal_v2_server.py --model-repository DIR --port 8001 --cpu 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import floor_server
import grpc
import numpy as np
from models import MODEL_VERSION, OUTPUT_NAME, build_infer_response, model_path, open_session

from gateway.protocol import inference as pb


def model_infer(args: argparse.Namespace) -> grpc.RpcMethodHandler:
    session = open_session(model_path(args.model_repository))
    outputs = [OUTPUT_NAME]

    async def infer(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        tensor = request.inputs[0]
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(tuple(tensor.shape))
        (output,) = session.run(outputs, {tensor.name: x})
        return build_infer_response(output, request.model_name, MODEL_VERSION, request.id)

    return grpc.unary_unary_rpc_method_handler(
        infer,
        request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=pb.ModelInferResponse.SerializeToString,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", type=Path, required=True, help="as written by models.build_repository")


if __name__ == "__main__":
    floor_server.main(__doc__, model_infer, add_arguments)
