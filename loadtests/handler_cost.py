"""What the gateway's ModelInfer handler costs without gRPC: in-process, in a tight loop, next to minimal V2's.

Inside a server the same Python costs 4-6x more per request than in a loop (caches and predictors
go cold between requests while gRPC's C core runs), and the server's p50 at concurrency 1 moves by
tens of microseconds from run to run. A loop has no such noise: it tells within a microsecond what a
change to the request path saved. Both handlers get perf_analyzer's request (the benchmark MLP, one
row, a bool request parameter, the output asked for by name) on uvloop; the gateway is built as
`serve` builds it (default settings, its request log in a temporary directory) and minimal V2's
handler is `minimal_v2_server.model_infer`'s, with its protobuf (de)serializers. Rounds alternate the
two. Then the gateway's parts one by one (best of 5): decoding, the route decision, the model's
onnxruntime run, the log record's commit, encoding the answer.

    python loadtests/handler_cost.py [--calls 20000] [--rounds 7] [--cpu 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import timeit
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
from minimal_v2_server import model_infer
from models import MODEL_NAME, OUTPUT_NAME, build_infer_request, build_repository

from gateway import codec
from gateway.config import GatewayConfig, with_overrides
from gateway.inference import InferenceResponse
from gateway.protocol import inference as pb
from gateway.requestlog.record import Record, Tensor
from gateway.server import Gateway

Handler = Callable[[bytes], Awaitable[Any]]


class LoopContext:
    """The little of grpc.aio's ServicerContext a handler asks for when the call carries no metadata."""

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> None:
        return None

    async def abort(self, code: object, details: str, trailing_metadata: object = ()) -> None:
        raise RuntimeError(f"the handler refused the request: {code}: {details}")


def perf_analyzers_request() -> bytes:
    """The benchmark request as perf_analyzer sends it (see tests/test_wire.py)."""
    request = pb.ModelInferRequest.FromString(build_infer_request())
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    request.outputs.add(name=OUTPUT_NAME)
    return request.SerializeToString()


def minimal_handler(repository: Path) -> Handler:
    handler = model_infer(argparse.Namespace(model_repository=repository))
    context = LoopContext()

    async def call(data: bytes) -> bytes:
        response = await handler.unary_unary(handler.request_deserializer(data), context)
        return bytes(handler.response_serializer(response))

    return call


async def per_call_us(handler: Handler, body: bytes, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        await handler(body)
    return (time.perf_counter() - start) / calls * 1e6


def best_us(function: Callable[[], object], calls: int) -> float:
    return min(timeit.repeat(function, number=calls, repeat=5)) / calls * 1e6


def parts(gateway: Gateway, body: bytes, calls: int) -> dict[str, float]:
    """The gateway's request-path steps, each on its own."""
    request = codec.decode(body)
    version = gateway.repository.get_ready(request.model_name, "")
    assert version.model is not None and gateway.request_log is not None
    model, log = version.model, gateway.request_log
    outputs = model.run(request.inputs)
    record = Record("handler-cost", time.time_ns(), MODEL_NAME, version.version, sha256=version.sha256)
    record.inputs = [Tensor.of(name, "FP32", array) for name, array in request.inputs.items()]
    record.outputs = [Tensor.of(OUTPUT_NAME, "FP32", outputs[0])]
    response = InferenceResponse(MODEL_NAME, version.version, "", record.id, record.outputs)
    ready = gateway.repository.ready_versions(MODEL_NAME)
    steps: dict[str, Callable[[], object]] = {
        "decode": lambda: codec.decode(body),
        "route": lambda: gateway.routes.current().decide(MODEL_NAME, ready),
        "model run (onnxruntime)": lambda: model.run(request.inputs),
        "log commit": lambda: log.write_now(record),
        "encode": lambda: codec.encode(response),
    }
    return {label: best_us(step, calls) for label, step in steps.items()}


async def measure(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="handler-cost-"))
    repository = build_repository(workdir / "models")
    config = with_overrides(GatewayConfig(), repository_path=str(repository), state_dir=str(workdir / "state"), port=0)
    gateway = Gateway(config)
    gateway.repository.load_all()
    context = LoopContext()
    body = perf_analyzers_request()

    async def gateway_call(data: bytes) -> bytes:
        return await gateway.inference.ModelInfer(data, context)  # type: ignore[arg-type]

    handlers = {"gateway": gateway_call, "minimal V2": minimal_handler(repository)}
    for handler in handlers.values():  # warm up, and check both answer the request
        reply = pb.ModelInferResponse.FromString(await handler(body))
        assert np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).size > 0
    results: dict[str, list[float]] = {label: [] for label in handlers}
    for _ in range(args.rounds):
        for label, handler in handlers.items():
            results[label].append(await per_call_us(handler, body, args.calls))
    print(f"{args.calls} calls per round, {args.rounds} rounds, alternating; us per call:")
    for label, values in results.items():
        print(f"  {label:12} median {statistics.median(values):6.2f}  rounds {' '.join(f'{v:.1f}' for v in values)}")
    gaps = [g - m for g, m in zip(results["gateway"], results["minimal V2"], strict=True)]
    print(f"  gateway - minimal V2: median {statistics.median(gaps):+.2f} us")
    print("gateway's parts, each alone (best of 5), us:")
    for label, us in parts(gateway, body, args.calls).items():
        print(f"  {label:34} {us:6.2f}")
    gateway.repository.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="handler calls per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not pin)")
    args = parser.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    uvloop.run(measure(args))


if __name__ == "__main__":
    main()
