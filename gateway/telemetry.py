"""OpenTelemetry traces and metrics for the gateway, chosen by `[telemetry]` in the config.

Why it is shaped like this: the request path must stay cheap, so it never creates child spans while
it works. It notes a few `perf_counter_ns` marks (routed, scored, executed, logged) that it takes
anyway, and after the log commit `RequestTracing.finish` builds the span tree from those marks with
explicit start and end times. Only the root span is started up front, so a sampled request's trace
id (the caller's, from W3C `traceparent`, or a new one) can go into its log record. With traces and
metrics both off (the default) the gateway holds no `Telemetry` at all and pays one `is None` test.

Metrics are OpenTelemetry SDK instruments labelled by model, version and role. Counts the gateway
keeps anyway (shadow calls and sheds, agreement, log queue depth, warm-up times, drift) are
observable instruments read at export time, so they cost nothing per request.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ConsoleMetricExporter,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.config import TelemetryConfig, address
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.requestlog.record import Record

log = logging.getLogger(__name__)

SCOPE = "canary-gateway"  # the instrumentation scope of every span and metric
_PROPAGATOR = TraceContextTextMapPropagator()
_STATUS_NAMES = {status.value[0]: status.name for status in grpc.StatusCode}


def _status_name(code: int) -> str:
    return _STATUS_NAMES.get(code, str(code))


@dataclass(slots=True)
class StageMarks:
    """`perf_counter_ns` marks the request path takes; 0 for a stage the request did not reach."""

    start: int
    routed: int = 0  # route decided, version chosen, input validated
    scored: int = 0  # OOD scoring done (0: the version has no profile)
    executed: int = 0  # the model answered (the micro-batcher returned)
    logged: int = 0  # the log record committed


# W3C trace context `traceparent`: version, trace id, parent id, flags. Shared with the request log's trace id.
TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-([0-9a-f]{2})")


class RequestTracing:
    """Spans for inference calls: the root started up front, its children built after the fact.

    The sampling decision is taken here, before the SDK is involved: a caller's valid `traceparent` decides
    by its sampled flag, other requests are kept with probability `sample_ratio`. An unsampled request
    then costs a dict lookup and a random draw, not an SDK span (~7 µs even when not recording).
    """

    def __init__(self, provider: TracerProvider, sample_ratio: float) -> None:
        self._tracer = provider.get_tracer(SCOPE)
        self._ratio = sample_ratio

    def start(self, headers: Mapping[str, str], start_epoch_ns: int) -> Span | None:
        """The request's root span, or None when the request is not sampled."""
        traceparent = headers.get("traceparent")
        caller = TRACEPARENT.fullmatch(traceparent.strip()) if traceparent is not None else None
        if caller is not None:
            if not int(caller.group(2), 16) & 1:
                return None  # the caller did not sample this trace
        # No or an invalid `traceparent`: W3C says to ignore it and start a new trace, so the ratio decides.
        elif self._ratio < 1.0 and random.random() >= self._ratio:
            return None
        parent = _PROPAGATOR.extract(carrier=headers)
        return self._tracer.start_span("ModelInfer", parent, kind=SpanKind.SERVER, start_time=start_epoch_ns)

    def finish(self, span: Span, marks: StageMarks, record: Record, rows: int) -> None:
        """Children for each stage the request reached, the root's attributes and status, then end."""
        if not span.is_recording():
            return
        base = record.ts_ns - marks.start  # perf_counter_ns -> epoch ns
        parent = trace.set_span_in_context(span)
        stages = (
            ("route", marks.start, marks.routed),
            ("ood", marks.routed, marks.scored),
            ("execute", marks.scored or marks.routed, marks.executed),
            ("log.commit", marks.executed or marks.scored or marks.routed or marks.start, marks.logged),
        )
        for name, begin, end in stages:
            if begin and end:
                self._tracer.start_span(name, parent, start_time=base + begin).end(end_time=base + end)
        span.set_attributes(
            {
                "model": record.model,
                "model.version": record.version,
                "role": record.role,
                "request.id": record.id,
                "rows": rows,
                "rpc.grpc.status_code": record.status,
            }
        )
        if record.ood is not None:
            span.set_attribute("ood", record.ood)
            span.set_attribute("ood.score", record.ood_score or 0.0)
        if record.routing_key is not None:
            span.set_attribute("routing.key", record.routing_key)
        if record.status:
            span.set_status(Status(StatusCode.ERROR, f"{_status_name(record.status)}: {record.message}"))
        span.end(end_time=base + (marks.logged or marks.executed or marks.routed or marks.start))

    def shadow(self, primary_span_context: trace.SpanContext | None, record: Record) -> None:
        """A span for a finished shadow call, a child of its primary's span."""
        if primary_span_context is None or not primary_span_context.is_valid:
            return
        parent = trace.set_span_in_context(trace.NonRecordingSpan(primary_span_context))
        span = self._tracer.start_span("shadow", parent, start_time=record.ts_ns)
        span.set_attributes({"model": record.model, "model.version": record.version, "request.id": record.id})
        if record.status:
            span.set_status(Status(StatusCode.ERROR, record.message))
        span.end(end_time=record.ts_ns + record.latency_ns)


# Latency buckets in seconds, 100 µs to 10 s (the SDK's default buckets are meant for milliseconds).
LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

Observe = Callable[[], Iterable[tuple[float, Mapping[str, str]]]]


COMMIT_SAMPLE = 16  # one answer in this many has its log-commit wait recorded (a sample of a distribution)
DURATION = "gateway.request.duration"


class LatencyHistograms:
    """Exact request-latency histograms per attribute set, at the cost of a bisect and three list updates
    per request. The SDK's `Histogram.record` costs ~17 µs with four attributes (more than all other
    telemetry together); these are handed to the exporters as one OpenTelemetry histogram metric at each
    collection instead (see `_with_latency`)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.start_ns = time.time_ns()
        self._series: dict[tuple[str, str, str, int], list[Any]] = {}  # key -> [bucket counts, sum, min, max]

    def record(self, key: tuple[str, str, str, int], seconds: float) -> None:
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = [[0] * (len(self.bounds) + 1), 0.0, seconds, seconds]
        series[0][bisect.bisect_left(self.bounds, seconds)] += 1  # bucket i holds (bounds[i-1], bounds[i]]
        series[1] += seconds
        if seconds < series[2]:
            series[2] = seconds
        elif seconds > series[3]:
            series[3] = seconds

    def metric(self, attributes: Mapping[tuple[str, str, str, int], Mapping[str, str]]) -> Metric | None:
        """The histograms as one cumulative OpenTelemetry metric (None before the first request)."""
        if not self._series:
            return None
        now = time.time_ns()
        points = [
            HistogramDataPoint(
                attributes=dict(attributes[key]),
                start_time_unix_nano=self.start_ns,
                time_unix_nano=now,
                count=sum(counts),
                sum=total,
                bucket_counts=list(counts),
                explicit_bounds=list(self.bounds),
                min=low,
                max=high,
            )
            for key, (counts, total, low, high) in list(self._series.items())
        ]
        return Metric(
            name=DURATION,
            description="request latency, receipt to answer (before its log commit)",
            unit="s",
            data=Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE),
        )


def _with_latency(reader: MetricReader, metrics: Callable[[], Metric | None]) -> MetricReader:
    """`reader`, with the latency histogram added to every collection it receives.

    `_receive_metrics` is the SDK's hook for readers (every reader implements it); the histogram goes
    into the gateway's instrumentation scope, so exporters see one ordinary histogram metric.
    """
    receive = reader._receive_metrics

    def receive_with_latency(metrics_data: MetricsData, *args: Any, **kwargs: Any) -> None:
        metric = metrics()
        if metric is not None:
            metrics_data = _add_metric(metrics_data, metric)
        receive(metrics_data, *args, **kwargs)

    reader._receive_metrics = receive_with_latency  # type: ignore[method-assign]
    return reader


def _add_metric(metrics_data: MetricsData, metric: Metric) -> MetricsData:
    resources = list(metrics_data.resource_metrics)
    for r, resource in enumerate(resources):
        for s, scope in enumerate(resource.scope_metrics):
            if scope.scope.name == SCOPE:
                scopes = list(resource.scope_metrics)
                scopes[s] = dataclasses.replace(scope, metrics=[*scope.metrics, metric])
                resources[r] = dataclasses.replace(resource, scope_metrics=scopes)
                return dataclasses.replace(metrics_data, resource_metrics=resources)
    return metrics_data  # no gateway metric at all yet: nothing to attach it to


class RequestMetrics:
    """Per-request figures at the cost of a dict update, exported through OpenTelemetry instruments.

    An SDK `Counter.add` costs ~10 µs (attribute hashing, a lock, aggregation) and `Histogram.record`
    ~17 µs; at thousands of requests a second on one core that is a visible share of the budget. So
    counts are kept in plain dicts and exported as observable counters (read at collection time), the
    latency histogram is kept exactly by `LatencyHistograms` and handed to the reader at collection,
    and the log-commit wait is recorded in the SDK for one answer in `COMMIT_SAMPLE`.
    """

    def __init__(self, provider: MeterProvider) -> None:
        meter = provider.get_meter(SCOPE)
        self._meter = meter
        self.durations = LatencyHistograms()
        self._commit = meter.create_histogram(
            "gateway.log.commit.duration",
            unit="s",
            description=f"time an answer waits for its log commit (one answer in {COMMIT_SAMPLE})",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        self._attributes: dict[tuple[str, str, str, int], dict[str, str]] = {}
        self._requests: dict[tuple[str, str, str, int], int] = {}
        self._ood: dict[tuple[str, str, str, int, bool], int] = {}
        self._answers = 0
        self.observe("gateway.requests", "counter", "answered requests", "{request}", self._request_counts)
        self.observe("gateway.ood.scored", "counter", "requests scored for OOD, by flag", "{request}", self._ood_counts)

    def observe(self, name: str, kind: str, description: str, unit: str, source: Observe) -> None:
        """Register an observable counter ("counter") or gauge ("gauge") read from `source` at export."""

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, dict(attributes)) for value, attributes in source()]

        make = self._meter.create_observable_counter if kind == "counter" else self._meter.create_observable_gauge
        make(name, callbacks=[callback], unit=unit, description=description)

    def duration_metric(self) -> Metric | None:
        return self.durations.metric(self._attributes)

    def _request_counts(self) -> Iterable[tuple[float, Mapping[str, str]]]:
        return [(count, self._attributes[key]) for key, count in list(self._requests.items())]

    def _ood_counts(self) -> Iterable[tuple[float, Mapping[str, str]]]:
        return [
            (count, {**self._attributes[key[:4]], "ood": "true" if key[4] else "false"})
            for key, count in list(self._ood.items())
        ]

    def request(self, record: Record, commit_ns: int) -> None:
        key = (record.model, record.version, record.role, record.status)
        attributes = self._attributes.get(key)
        if attributes is None:
            attributes = self._attributes[key] = {
                "model": record.model,
                "version": record.version,
                "role": record.role,
                "status": _status_name(record.status),
            }
        self._requests[key] = self._requests.get(key, 0) + 1
        self.durations.record(key, record.latency_ns / 1e9)
        if record.ood is not None:
            ood_key = (*key, record.ood)
            self._ood[ood_key] = self._ood.get(ood_key, 0) + 1
        self._answers += 1
        if commit_ns and self._answers % COMMIT_SAMPLE == 0:
            self._commit.record(commit_ns / 1e9)


class Telemetry:
    """What `[telemetry]` turned on: `tracing` and/or `metrics` (None when off), and their providers."""

    def __init__(
        self,
        config: TelemetryConfig,
        span_exporter: SpanExporter | None = None,
        metric_reader: MetricReader | None = None,
        instance: str = "",
    ) -> None:
        # Each worker of `serve --workers N` exports its own series, told apart by service.instance.id.
        attributes = {"service.name": config.service_name} | ({"service.instance.id": instance} if instance else {})
        resource = Resource.create(attributes)
        self._tracer_provider: TracerProvider | None = None
        self._meter_provider: MeterProvider | None = None
        self._http_server: Any = None  # the Prometheus scrape endpoint, when metrics = "prometheus"
        self.tracing: RequestTracing | None = None
        self.metrics: RequestMetrics | None = None
        span_exporter = span_exporter or _span_exporter(config)
        if span_exporter is not None:
            # RequestTracing samples before it starts a span; whatever it starts is recorded.
            self._tracer_provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
            self._tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
            self.tracing = RequestTracing(self._tracer_provider, config.trace_sample_ratio)
        if metric_reader is None and config.metrics == "prometheus":
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import start_http_server

            try:
                self._http_server, _ = start_http_server(config.prometheus_port, addr=config.prometheus_host)
            except OSError as e:  # in use, or not an address of this host: a setting to change, not a crash
                where = address(config.prometheus_host, config.prometheus_port)
                raise ConfigError(
                    f"telemetry.prometheus_port: cannot serve metrics on {where}: {e.strerror or e}"
                ) from e
            metric_reader = PrometheusMetricReader()
        metric_reader = metric_reader or _metric_reader(config)
        if metric_reader is not None:
            self._meter_provider = MeterProvider(resource=resource, metric_readers=[metric_reader])
            self.metrics = RequestMetrics(self._meter_provider)
            _with_latency(metric_reader, self.metrics.duration_metric)
        log.info(
            "telemetry: traces %s (sample ratio %g), metrics %s",
            config.traces if self.tracing else "off",
            config.trace_sample_ratio,
            _metrics_description(config) if self.metrics else "off",
        )

    def shutdown(self) -> None:
        """Flush what is buffered (spans, a last metrics export) and stop the exporters."""
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        if self._meter_provider is not None:
            self._meter_provider.shutdown()
        if self._http_server is not None:
            self._http_server.shutdown()


def build(config: TelemetryConfig, instance: str = "") -> Telemetry | None:
    """The gateway's telemetry, or None when `[telemetry]` turns everything off (the default)."""
    if config.traces == "none" and config.metrics == "none":
        return None
    return Telemetry(config, instance=instance)


def _span_exporter(config: TelemetryConfig) -> SpanExporter | None:
    if config.traces == "console":
        return ConsoleSpanExporter()
    if config.traces == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=config.otlp_insecure)
    return None


def _metric_reader(config: TelemetryConfig) -> MetricReader | None:
    interval_ms = config.export_interval_s * 1000
    if config.metrics == "console":
        return PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=interval_ms)
    if config.metrics == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter(endpoint=config.otlp_endpoint, insecure=config.otlp_insecure)
        return PeriodicExportingMetricReader(exporter, export_interval_millis=interval_ms)
    return None


def _metrics_description(config: TelemetryConfig) -> str:
    if config.metrics == "prometheus":
        return f"prometheus on http://{config.prometheus_host}:{config.prometheus_port}/metrics"
    if config.metrics == "otlp":
        return f"otlp to {config.otlp_endpoint} every {config.export_interval_s:g} s"
    return f"{config.metrics} every {config.export_interval_s:g} s"
