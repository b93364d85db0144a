"""What the floor servers share, so they differ only in their ModelInfer handler.

A floor is a deliberately bare grpc.aio server on uvloop, listening on one address, optionally pinned
to one CPU, stopped by SIGTERM. Each also answers `ServerReady` (always ready), so bench_core waits for
every server, floors and gateway, the same way, and the metadata RPCs Triton's perf_analyzer asks
before it sends ModelInfer (fixed replies describing the benchmark MLP), so it can drive a floor too.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator, Callable

import grpc
import uvloop
from affinity import parse_cpus, pin
from models import metadata_answers

from gateway.protocol import inference as pb

SERVICE = "inference.GRPCInferenceService"
MODEL_INFER = f"/{SERVICE}/ModelInfer"
SERVER_READY = f"/{SERVICE}/ServerReady"
GRACE_S = 1.0


def bytes_handler(response: bytes) -> grpc.RpcMethodHandler:
    """A unary handler that answers every call with `response`, serializers bypassed (bytes in, bytes out)."""

    async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    return grpc.unary_unary_rpc_method_handler(answer, request_deserializer=None, response_serializer=None)


def stream_echo_handler(response: pb.ModelInferResponse) -> grpc.RpcMethodHandler:
    """A ModelStreamInfer handler answering each request with `response` carrying the request's id: the
    streaming transport's floor (one parse and one serialise per message, needed to echo the id)."""

    async def answer(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        reply = pb.ModelStreamInferResponse()
        reply.infer_response.CopyFrom(response)
        async for request in requests:
            reply.infer_response.id = pb.ModelInferRequest.FromString(request).id
            yield reply.SerializeToString()

    return grpc.stream_stream_rpc_method_handler(answer, request_deserializer=None, response_serializer=None)


async def _serve(
    model_infer: grpc.RpcMethodHandler, host: str, port: int, stream_infer: grpc.RpcMethodHandler | None = None
) -> None:
    server = grpc.aio.server()
    ready = bytes_handler(pb.ServerReadyResponse(ready=True).SerializeToString())
    handlers = {"ModelInfer": model_infer, "ServerReady": ready}
    handlers.update((name, bytes_handler(reply)) for name, reply in metadata_answers().items())
    if stream_infer is not None:
        handlers["ModelStreamInfer"] = stream_infer
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    address = f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"listening on {host}:{bound}", flush=True)
    await stop.wait()
    await server.stop(GRACE_S)


def main(
    description: str | None,
    model_infer: Callable[[argparse.Namespace], grpc.RpcMethodHandler],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
    stream_infer: grpc.RpcMethodHandler | None = None,
) -> None:
    """Parse the common flags (and the floor's own), pin, build the handler, serve until SIGTERM."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port (printed on start)")
    parser.add_argument("--cpu", type=parse_cpus, help="pin the server to these CPUs, e.g. 0")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    pin(args.cpu)  # before grpc and onnxruntime start their threads, so those inherit it
    uvloop.run(_serve(model_infer(args), args.host, args.port, stream_infer))
