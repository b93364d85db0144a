"""OpenTelemetry from a real gateway: spans exported over OTLP to a collector the test runs, metrics
scraped from the Prometheus endpoint, and the log record pointing at the trace."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import GatewayProcess
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client.parser import text_string_to_metric_families

from gateway.protocol import Stub
from gateway.protocol import inference as pb
from gateway.requestlog.reader import LogReader

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []

    def Export(  # noqa: N802 (the OTLP method name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, trace_hex: str, count: int, timeout: float = 20.0) -> list[trace_pb2.Span]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [s for s in self.spans if s.trace_id.hex() == trace_hex]
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise AssertionError(f"{count} spans of trace {trace_hex} not exported; got {len(self.spans)} spans in all")


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    received = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(received, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield received, port
    server.stop(0)


@pytest.fixture(scope="module")
def observed_gateway(
    repository: Path, collector: tuple[Collector, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, int]]:
    metrics_port = _free_port()
    config = (
        f'[telemetry]\ntraces = "otlp"\notlp_endpoint = "http://127.0.0.1:{collector[1]}"\n'
        f'metrics = "prometheus"\nprometheus_port = {metrics_port}\n'
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export spans every 100 ms, not every 5 s
        process = GatewayProcess(repository, config, tmp_path_factory.mktemp("telemetry"))
    process.wait_ready()
    yield process, metrics_port
    assert process.stop() == 0, process.log


def _mlp(request_id: str, features: int = 32, version: str = "1") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mlp", model_version=version, id=request_id)
    x = np.ones((1, features), dtype=np.float32)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def test_a_callers_trace_is_continued_with_a_span_per_stage(
    observed_gateway: tuple[GatewayProcess, int], collector: tuple[Collector, int]
) -> None:
    gateway, _ = observed_gateway
    with grpc.insecure_channel(gateway.address) as channel:
        traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
        Stub(channel).ModelInfer(_mlp("traced-1"), metadata=[("traceparent", traceparent)], timeout=10)
    spans = collector[0].wait_for(CALLER_TRACE, 4)
    (root,) = [s for s in spans if s.name == "ModelInfer"]
    assert root.parent_span_id.hex() == CALLER_SPAN
    attributes = {a.key: a.value for a in root.attributes}
    assert attributes["model"].string_value == "mlp" and attributes["model.version"].string_value == "1"
    assert attributes["request.id"].string_value == "traced-1"
    children = {s.name: s for s in spans if s.parent_span_id == root.span_id}
    assert {"route", "execute", "log.commit"} <= set(children)
    for child in children.values():
        assert root.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano
        assert child.end_time_unix_nano <= root.end_time_unix_nano
    assert children["route"].end_time_unix_nano <= children["execute"].end_time_unix_nano
    (record,) = LogReader(gateway.state_dir / "log").get("traced-1")
    assert record.trace_id == CALLER_TRACE


def test_a_request_without_trace_context_starts_a_trace_named_in_its_log_record(
    observed_gateway: tuple[GatewayProcess, int], collector: tuple[Collector, int]
) -> None:
    gateway, _ = observed_gateway
    with grpc.insecure_channel(gateway.address) as channel, pytest.raises(grpc.RpcError):
        Stub(channel).ModelInfer(_mlp("traced-bad", features=31), timeout=10)
    (record,) = LogReader(gateway.state_dir / "log").get("traced-bad")
    assert record.trace_id is not None and record.trace_id != CALLER_TRACE
    spans = collector[0].wait_for(record.trace_id, 2)
    (root,) = [s for s in spans if s.name == "ModelInfer"]
    assert root.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert "INVALID_ARGUMENT" in root.status.message


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if not k.startswith("otel_"))
            samples[(sample.name, labels)] = sample.value
    return samples


def test_prometheus_endpoint_counts_known_traffic_by_model_version_role_status(
    observed_gateway: tuple[GatewayProcess, int],
) -> None:
    gateway, port = observed_gateway
    with grpc.insecure_channel(gateway.address) as channel:
        stub = Stub(channel)
        for i in range(7):
            stub.ModelInfer(_mlp(f"metrics-ok-{i}", version="2"), timeout=10)
        for i in range(3):
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(_mlp(f"metrics-bad-{i}", features=30, version="2"), timeout=10)
    samples = _scrape(port)
    ok = frozenset({("model", "mlp"), ("version", "2"), ("role", "primary"), ("status", "OK")})
    bad = frozenset({("model", "mlp"), ("version", "2"), ("role", "primary"), ("status", "INVALID_ARGUMENT")})
    assert samples[("gateway_requests_total", ok)] == 7
    assert samples[("gateway_requests_total", bad)] == 3
    assert samples[("gateway_request_duration_seconds_count", ok)] == 7
    assert 0 < samples[("gateway_request_duration_seconds_sum", ok)] < 7 * 1.0
    warm = frozenset({("model", "mlp"), ("version", "2")})
    assert samples[("gateway_model_warmup_duration_seconds", warm)] > 0
    assert samples[("gateway_log_queue_depth", frozenset())] >= 0


def test_metrics_count_every_request_of_a_concurrent_load(observed_gateway: tuple[GatewayProcess, int]) -> None:
    gateway, port = observed_gateway
    per_worker, workers = 40, 16

    async def load() -> None:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = Stub(channel)

            async def worker(w: int) -> None:
                for i in range(per_worker):
                    request = pb.ModelInferRequest(model_name="wide_thread", id=f"load-{w}-{i}")
                    x = np.ones((1, 64), dtype=np.float32)
                    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
                    request.raw_input_contents.append(x.tobytes())
                    await stub.ModelInfer(request, timeout=30)

            await asyncio.gather(*(worker(w) for w in range(workers)))

    asyncio.run(load())
    samples = _scrape(port)
    ok = frozenset({("model", "wide_thread"), ("version", "1"), ("role", "primary"), ("status", "OK")})
    assert samples[("gateway_requests_total", ok)] == per_worker * workers
    assert samples[("gateway_request_duration_seconds_count", ok)] == per_worker * workers


def test_a_trace_the_caller_did_not_sample_is_not_recorded_but_still_logged(
    observed_gateway: tuple[GatewayProcess, int], collector: tuple[Collector, int]
) -> None:
    gateway, _ = observed_gateway
    unsampled = "0af7651916cd43dd8448eb211c80319c"
    with grpc.insecure_channel(gateway.address) as channel:
        Stub(channel).ModelInfer(_mlp("unsampled-1"), metadata=[("traceparent", f"00-{unsampled}-b7ad6b7169203331-00")])
        # A sampled request after it: once its spans are exported, the unsampled one's would have been too.
        Stub(channel).ModelInfer(
            _mlp("sampled-after"), metadata=[("traceparent", f"00-{CALLER_TRACE[::-1]}-{CALLER_SPAN}-01")]
        )
    collector[0].wait_for(CALLER_TRACE[::-1], 4)
    assert not [s for s in collector[0].spans if s.trace_id.hex() == unsampled]
    (record,) = LogReader(gateway.state_dir / "log").get("unsampled-1")
    assert record.trace_id == unsampled


def test_an_invalid_traceparent_is_ignored_and_the_request_traced_by_the_ratio(
    observed_gateway: tuple[GatewayProcess, int], collector: tuple[Collector, int]
) -> None:
    gateway, _ = observed_gateway  # trace_sample_ratio is the default 1.0: every request is kept
    with grpc.insecure_channel(gateway.address) as channel:
        # "garbage" ends in an even hex digit, which a flags test on the raw header read as "not sampled".
        Stub(channel).ModelInfer(_mlp("invalid-traceparent"), metadata=[("traceparent", "garbage")], timeout=10)
    (record,) = LogReader(gateway.state_dir / "log").get("invalid-traceparent")
    assert record.trace_id is not None
    spans = collector[0].wait_for(record.trace_id, 4)
    (root,) = [s for s in spans if s.name == "ModelInfer"]
    assert not root.parent_span_id


def test_latency_histograms_equal_the_sdks_own_histogram() -> None:
    """The gateway keeps latency histograms itself (the SDK's record costs ~17 µs a call); exported,
    they must be what the SDK's Histogram would have produced from the same values."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from gateway.requestlog.record import Record
    from gateway.telemetry import LATENCY_BUCKETS_S, RequestMetrics, _with_latency

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics = RequestMetrics(provider)
    _with_latency(reader, metrics.duration_metric)
    reference = provider.get_meter("reference").create_histogram(
        "reference", explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S
    )
    values = np.random.default_rng(3).lognormal(-7, 2, 5000)  # 0.1 µs to seconds
    values[:16] = LATENCY_BUCKETS_S  # exactly on the bounds: a bucket includes its upper bound
    for i, seconds in enumerate(values):
        record = Record(f"r{i}", 0, "mlp", "1", status=3 if i % 10 == 0 else 0)
        record.latency_ns = int(round(seconds * 1e9))
        metrics.request(record, 0)
        reference.record(record.latency_ns / 1e9, {"status": "INVALID_ARGUMENT" if i % 10 == 0 else "OK"})
    points = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name in ("gateway.request.duration", "reference"):
                    for point in metric.data.data_points:
                        points[(metric.name, point.attributes["status"])] = point
    for status in ("OK", "INVALID_ARGUMENT"):
        ours, theirs = points[("gateway.request.duration", status)], points[("reference", status)]
        assert list(ours.bucket_counts) == list(theirs.bucket_counts)
        assert ours.count == theirs.count and ours.sum == pytest.approx(theirs.sum)
        assert (ours.min, ours.max) == (theirs.min, theirs.max)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_prometheus_port_in_use_is_a_configuration_error_naming_the_setting(
    repository: Path, tmp_path: Path, workers: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "gateway.toml").write_text(f'[telemetry]\nmetrics = "prometheus"\nprometheus_port = {port}\n')
        argv = [sys.executable, "-m", "gateway", "serve", "--model-repository", str(repository), "--port", "0"]
        argv += [
            "--workers",
            workers,
            "--state-dir",
            str(tmp_path / "state"),
            "--config",
            str(tmp_path / "gateway.toml"),
        ]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert (
        f"telemetry.prometheus_port: cannot serve metrics on 127.0.0.1:{port}: Address already in use" in result.stderr
    )
    assert "Traceback" not in result.stderr
