"""An OTLP/gRPC collector that accepts and discards traces and metrics: what the gateway's exporters
talk to in a benchmark, so their real cost (encoding, batching, the export call) is measured without
running a collector. It counts what it received and prints the counts when stopped.

    python loadtests/otlp_sink.py --port 4317 --cpu 1
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc
from affinity import parse_cpus, pin
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.spans = 0
        self.metric_exports = 0
        self._lock = threading.Lock()

    def Export(self, request: object, context: grpc.ServicerContext) -> object:  # noqa: N802 (OTLP's name)
        with self._lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                return trace_service_pb2.ExportTraceServiceResponse()
            self.metric_exports += 1
            return metrics_service_pb2.ExportMetricsServiceResponse()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4317, help="0 picks a free port (printed on start)")
    parser.add_argument("--cpu", type=parse_cpus, help="pin the sink to these CPUs")
    args = parser.parse_args()
    pin(args.cpu)
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(sink, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"listening on {args.host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    print(f"received {sink.spans} spans and {sink.metric_exports} metric exports", flush=True)


if __name__ == "__main__":
    main()
