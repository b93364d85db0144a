"""The protocol-agnostic core: `infer(request) -> response` on plain objects and numpy arrays.

Transports (the gRPC servicer today) convert their messages to `InferenceRequest` and back; all
validation against the model's signature and all execution happens here, and so do the limits: the
caller's rate, the client's deadline, each version's in-flight and queue bounds, tensor sizes. A
refused request is logged like any other, and counted by model and limit in `refusals`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import secrets
import time
from collections.abc import Awaitable, Iterable, Mapping
from typing import Protocol

import grpc
import numpy as np
from opentelemetry.trace import Span

from gateway.auth import Identity
from gateway.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    GatewayError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from gateway.ood.scoring import OodResult
from gateway.ratelimit import RateLimiter
from gateway.repository import ModelRepository, ModelVersion
from gateway.requestlog.record import ROLE_FALLBACK, Record, Tensor
from gateway.requestlog.writer import LogWriter
from gateway.runtime import check_input, shape_text
from gateway.shadows import ShadowRunner
from gateway.stats import Traffic
from gateway.telemetry import TRACEPARENT, StageMarks, Telemetry
from router.control import RouteControl
from router.rules import StickyKey
from router.table import OVERRIDE_HEADER


class Parameters(Protocol):
    """A request's parameters as text, read only when needed (the transport keeps them undecoded)."""

    def __call__(self, name: str) -> str | None: ...

    def names(self) -> Iterable[str]: ...


class NoParameters:
    def __call__(self, name: str) -> str | None:
        return None

    def names(self) -> Iterable[str]:
        return ()


SEGMENT_PREFIX = "segment."


def segments_of(parameters: Parameters, declared: tuple[str, ...], model: str) -> dict[str, str] | None:
    """The request's `segment.NAME` parameters; INVALID_ARGUMENT for a name the model does not declare,
    so attributes nobody agreed to collect are never logged."""
    found: dict[str, str] = {}
    for key in parameters.names():
        if not key.startswith(SEGMENT_PREFIX):
            continue
        name = key[len(SEGMENT_PREFIX) :]
        if name not in declared:
            raise InvalidArgument(
                f"parameters[{key}]: segment attribute {name!r} is not declared for model {model!r} "
                f"(declared: {list(declared)}); add it to models.{model}.segments to collect it"
            )
        value = parameters(key)
        if value is not None:
            found[name] = value
    return found or None


class InferenceRequest:
    __slots__ = (
        "model_name",
        "model_version",
        "id",
        "inputs",
        "outputs",
        "datatypes",
        "headers",
        "parameter",
        "caller",
        "deadline",
    )

    def __init__(
        self,
        model_name: str,
        model_version: str,
        id: str,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        datatypes: dict[str, str],
        headers: Mapping[str, str] | None = None,
        parameter: Parameters | None = None,
        caller: Identity | None = None,
        deadline: float | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.id = id
        self.inputs = inputs  # by name, decoded zero-copy from the request bytes
        self.outputs = outputs  # requested output names; empty means all
        self.datatypes = datatypes  # the protocol datatype each input was declared with
        self.headers = headers or {}  # transport metadata (sticky routing key, route override)
        # Request parameters as text, looked up only if a route or the model's segments need them.
        self.parameter: Parameters = parameter if parameter is not None else NoParameters()
        self.caller = caller  # the authenticated caller, if the request carried a token
        self.deadline = deadline  # the client's deadline as a time.monotonic() value; None: no deadline


class InferenceResponse:
    __slots__ = ("model_name", "model_version", "id", "request_id", "outputs", "ood", "ood_features")

    def __init__(
        self,
        model_name: str,
        model_version: str,
        id: str,
        request_id: str,
        outputs: list[Tensor],
        ood: OodResult | None = None,
        ood_features: str | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.id = id  # the client's id, echoed
        self.request_id = request_id  # the log's id: the client's id, or one generated for it
        self.outputs = outputs  # the requested outputs, as bytes once: the log record holds the same
        self.ood = ood  # the input's OOD scores, when the answering version has a profile
        self.ood_features = ood_features  # when flagged: the furthest features, as text


class RequestIds:
    """Ids for requests that arrive without one: unique across processes and restarts, and cheap."""

    def __init__(self) -> None:
        self._prefix = f"{os.getpid():x}-{secrets.token_hex(4)}-"
        self._next = itertools.count(1).__next__

    def next(self) -> str:
        return f"{self._prefix}{self._next():x}"


def trace_id(traceparent: str | None) -> str | None:
    """The caller's W3C trace id (from `traceparent` metadata), so a logged prediction leads to its trace."""
    if not traceparent:
        return None
    match = TRACEPARENT.fullmatch(traceparent.strip())
    if match is None or match.group(1) == "0" * 32:
        return None
    return match.group(1)


def _routing_key(sticky: StickyKey | None, request: InferenceRequest) -> str | None:
    if sticky is None:
        return None
    if sticky.source == "metadata":
        return request.headers.get(sticky.name)
    return request.parameter(sticky.name)


def _status(error: GatewayError) -> int:
    return int(error.code.value[0])


OK = int(grpc.StatusCode.OK.value[0])
# A cancel this close to the deadline is the deadline: the client's own timer fires first (it started
# before the server saw the call) and cancels the call a few milliseconds before the server's would.
DEADLINE_SLACK_S = 0.02


def _check_sizes(version: ModelVersion, request: InferenceRequest) -> None:
    """The configured rank and element limits, checked on every input before the signature is."""
    serving = version.serving
    for name, array in request.inputs.items():
        if serving.max_tensor_rank and array.ndim > serving.max_tensor_rank:
            raise InvalidArgument(
                f"inputs[{name}].shape: rank {array.ndim} exceeds max_tensor_rank {serving.max_tensor_rank} "
                f"of model {version.name!r}",
                limit="max_tensor_rank",
            )
        if serving.max_tensor_elements and array.size > serving.max_tensor_elements:
            raise InvalidArgument(
                f"inputs[{name}].shape: {shape_text(array.shape)} has {array.size} elements, more than "
                f"max_tensor_elements {serving.max_tensor_elements} of model {version.name!r}",
                limit="max_tensor_elements",
            )


def _admit(version: ModelVersion) -> None:
    """Refuse (RESOURCE_EXHAUSTED) a request the version has no room for: shedding early keeps the
    latency of admitted requests bounded when more arrive than the model can run."""
    serving = version.serving
    assert version.batcher is not None
    queue_limit = serving.queue_limit
    if queue_limit and version.batcher.queued >= queue_limit:
        raise ResourceExhausted(
            f"model {version.name!r} version {version.version!r}: max_queue reached ({queue_limit} requests "
            "waiting for the model); try again later",
            limit="max_queue",
            retry_after_ms=_one_run_ms(version),
        )
    if serving.max_in_flight and version.in_flight >= serving.max_in_flight:
        raise ResourceExhausted(
            f"model {version.name!r} version {version.version!r}: max_in_flight reached "
            f"({serving.max_in_flight} requests in flight); try again later",
            limit="max_in_flight",
            retry_after_ms=_one_run_ms(version),
        )


def _one_run_ms(version: ModelVersion) -> int:
    """A full queue moves by one batch per run: a retry after one run's time may find room."""
    return max(1, math.ceil(version.stats.mean_run_ms()))


class InferenceService:
    """Validates a request against the chosen version's signature, runs it, and logs it: the
    answer (or the error) is returned only after its log record is committed."""

    def __init__(
        self,
        repository: ModelRepository,
        request_log: LogWriter | None,
        routes: RouteControl,
        shadows: ShadowRunner,
        traffic: Traffic,
        telemetry: Telemetry | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.repository = repository
        self._rate_limiter = rate_limiter
        self.refusals: dict[tuple[str, str], int] = {}  # (model, limit) -> requests that limit refused
        self._traffic = traffic
        self._log = request_log
        self._routes = routes
        self._shadows = shadows
        self._ids = RequestIds()
        self._tracing = telemetry.tracing if telemetry is not None else None
        self._metrics = telemetry.metrics if telemetry is not None else None

    def _validate(self, version: ModelVersion, request: InferenceRequest) -> int:
        """Check inputs and outputs; return the batch size (rows) of the request."""
        model = version.model
        assert model is not None  # a ready version has a model
        if version.serving.max_tensor_rank or version.serving.max_tensor_elements:
            _check_sizes(version, request)
        expected = model.inputs
        inputs = request.inputs
        if inputs.keys() != model.input_names:
            names = [s.name for s in expected]
            missing = [n for n in names if n not in inputs]
            if missing:
                raise InvalidArgument(f"inputs: missing input {missing[0]!r}; the model expects {names}")
            extra = [n for n in inputs if n not in names]
            raise InvalidArgument(f"inputs: unexpected input {extra[0]!r}; the model expects {names}")
        reject_non_finite = version.serving.reject_non_finite
        for spec in expected:
            check_input(spec, inputs[spec.name], request.datatypes[spec.name], reject_non_finite)
        rows = 1
        if model.batchable:
            rows = inputs[expected[0].name].shape[0]  # names matched, decoding needs an input, ranks are checked
            if len(expected) > 1 and any(a.shape[0] != rows for a in inputs.values()):
                batch_sizes = sorted({a.shape[0] for a in inputs.values()})
                raise InvalidArgument(f"inputs: batch dimensions differ across inputs: {batch_sizes}")
            if rows == 0:
                raise InvalidArgument("inputs: empty batch (dimension 0 is 0)")
            if version.serving.max_batch_size and rows > version.serving.max_batch_size:  # 0: no batching
                raise InvalidArgument(
                    f"inputs: batch size {rows} exceeds max_batch_size {version.serving.max_batch_size}"
                )
        for name in request.outputs:
            if name not in model.output_names:
                raise InvalidArgument(f"outputs: unknown output {name!r}; the model has {model.output_names}")
        return rows

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        if self._log is not None:
            self._log.admit()
        ts_ns = time.time_ns()
        marks = StageMarks(time.perf_counter_ns())
        request_id = request.id or self._ids.next()
        record = Record(request_id, ts_ns, request.model_name, request.model_version)
        record.inputs = [Tensor.of(name, request.datatypes[name], a) for name, a in request.inputs.items()]
        record.caller = request.caller.name if request.caller is not None else None
        record.trace_id = trace_id(request.headers.get("traceparent"))
        span = None
        if self._tracing is not None:
            span = self._tracing.start(request.headers, ts_ns)
            if span is not None:
                record.trace_id = f"{span.get_span_context().trace_id:032x}"
        rows = 0
        version: ModelVersion | None = None
        deadline = request.deadline
        try:
            caller = request.caller
            if caller is not None and self._rate_limiter is not None:
                wait_s = self._rate_limiter.take(caller.name)
                if wait_s:
                    raise ResourceExhausted(
                        f"caller {caller.name!r} is over its rate limit of {self._rate_limiter.rate_per_s:g} "
                        f"requests/s (burst {self._rate_limiter.burst:g}); try again later",
                        limit="rate_limit",
                        retry_after_ms=max(1, math.ceil(wait_s * 1000)),
                    )
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    "deadline: passed before the gateway began to process the request; not run", limit="deadline"
                )
            table = self._routes.current()  # one snapshot for the whole decision
            routing_key = _routing_key(table.sticky_key(request.model_name), request)
            record.routing_key = routing_key
            available = self.repository.ready_versions(request.model_name)
            if not available:  # loading or failed: say which, precisely
                self.repository.get_ready(request.model_name, request.model_version)
            decision = table.decide(
                request.model_name,
                available,
                routing_key,
                request.model_version,
                request.headers.get(OVERRIDE_HEADER),
                request.caller.roles if request.caller is not None else frozenset(),
            )
            version = self.repository.get_ready(request.model_name, decision.version)
            record.version, record.sha256 = version.version, version.sha256
            if version.serving.segments:  # parameters are read only for models that declare segments
                record.segments = segments_of(request.parameter, version.serving.segments, version.name)
            rows = self._validate(version, request)
            marks.routed = time.perf_counter_ns()
            ood = None
            if version.ood is not None:
                version, ood = self._screen(version, request, record)
                marks.scored = time.perf_counter_ns()
            assert version.batcher is not None and version.model is not None
            _admit(version)
            feeds = {spec.name: request.inputs[spec.name] for spec in version.model.inputs}
            version.in_flight += 1  # max_in_flight counts it; an unload waits for it
            try:
                outputs = version.batcher.submit(feeds, rows, deadline)
                results = outputs if isinstance(outputs, list) else await outputs
            finally:
                version.in_flight -= 1
            marks.executed = time.perf_counter_ns()
        except GatewayError as error:
            await self._fail(error, record, marks, span, rows, version)
            raise
        except asyncio.CancelledError:
            # The transport gave up on the call: its deadline passed (gRPC cancels the handler then) or
            # the client went away. The request still gets its one log record.
            if deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S:
                gone: GatewayError = DeadlineExceeded("deadline: passed before the answer was ready", limit="deadline")
            else:
                early = f" ({(deadline - time.monotonic()) * 1e3:.1f} ms before its deadline)" if deadline else ""
                gone = Cancelled(f"the caller cancelled the call before its answer was ready{early}")
            await self._fail(gone, record, marks, span, rows, version)
            raise
        version.stats.record_request(rows, marks.executed - marks.start, ok=True)
        wanted = set(request.outputs)
        record.outputs = [
            Tensor.of(spec.name, spec.dtype.v2_name, array)
            for spec, array in zip(version.model.outputs, results, strict=True)
            if not wanted or spec.name in wanted
        ]
        fsync = self._commit(record, marks, span, rows)
        if fsync is not None:
            await fsync
        if decision.shadows:
            self._shadows.mirror(record, decision.shadows, feeds, request.datatypes, rows, results, span)
        return InferenceResponse(
            version.name, version.version, request.id, request_id, record.outputs, ood, record.ood_features
        )

    async def _fail(
        self,
        error: GatewayError,
        record: Record,
        marks: StageMarks,
        span: Span | None,
        rows: int,
        version: ModelVersion | None,
    ) -> None:
        """Count and log a request that gets `error` instead of an answer."""
        if version is not None:
            version.stats.record_request(rows, time.perf_counter_ns() - marks.start, ok=False)
        if error.limit is not None:
            key = (record.model, error.limit)
            self.refusals[key] = self.refusals.get(key, 0) + 1
        record.status, record.message = _status(error), error.message
        fsync = self._commit(record, marks, span, rows)
        if fsync is not None:
            await fsync

    def _screen(
        self, version: ModelVersion, request: InferenceRequest, record: Record
    ) -> tuple[ModelVersion, OodResult]:
        """Score the input against the version's training profile and apply the model's OOD policy:
        the version that will answer (the fallback, for `fallback`) and the scores."""
        assert version.ood is not None
        rows = request.inputs[version.ood_input]
        ood = version.ood.score(rows)
        record.ood_score, record.ood = ood.max_score, ood.any_flagged
        if version.drift is not None:
            version.drift.defer(rows, ood.flagged if ood.any_flagged else None)
        if not ood.any_flagged:
            return version, ood
        record.ood_features = ood.features_text()
        policy = version.serving.ood_policy
        if policy == "reject":
            raise FailedPrecondition(
                f"inputs[{version.ood_input}]: out of distribution for model {version.name!r} version "
                f"{version.version!r}: score {ood.max_score:.3f} > threshold {ood.threshold:.3f}; "
                f"furthest features {record.ood_features}"
            )
        if policy == "fallback":
            fallback = self.repository.versions_of(version.name).get(version.serving.ood_fallback_version)
            if fallback is None or not fallback.ready:  # e.g. failed to load: name the setting, not model_version
                state = "not loaded" if fallback is None else fallback.state
                reason = f": {fallback.reason}" if fallback is not None and fallback.reason else ""
                raise Unavailable(
                    f"inputs[{version.ood_input}]: out of distribution for model {version.name!r} version "
                    f"{version.version!r}, and its fallback version {version.serving.ood_fallback_version!r} "
                    f"(models.{version.name}.ood_fallback_version) is {state}{reason}"
                )
            version = fallback
            record.role, record.version, record.sha256 = ROLE_FALLBACK, version.version, version.sha256
            self._validate(version, request)
        return version, ood

    async def reject_unprocessed(
        self, model_name: str, model_version: str, client_id: str, error: GatewayError, raw_request: bytes
    ) -> str:
        """Log a request refused before it could be processed (undecodable, unauthenticated), keeping
        its bytes; return its request id."""
        request_id = client_id or self._ids.next()
        record = Record(request_id, time.time_ns(), model_name, model_version, status=_status(error))
        record.message, record.raw_request = error.message, raw_request
        fsync = self._commit(record, StageMarks(time.perf_counter_ns()))
        if fsync is not None:
            await fsync
        return request_id

    def _commit(
        self, record: Record, marks: StageMarks, span: Span | None = None, rows: int = 0
    ) -> Awaitable[None] | None:
        """Log `record`; None once done, or (with fsync) what to await until it is. Not a coroutine:
        without fsync the request path commits without one more coroutine to create and resume."""
        answered = time.perf_counter_ns()
        record.latency_ns = answered - marks.start
        fsynced = self._log.write(record) if self._log is not None else None
        if fsynced is not None:
            return self._logged_after(fsynced, record, marks, span, rows, answered)
        self._logged(record, marks, span, rows, answered)
        return None

    async def _logged_after(
        self, fsynced: Awaitable[None], record: Record, marks: StageMarks, span: Span | None, rows: int, answered: int
    ) -> None:
        await fsynced
        self._logged(record, marks, span, rows, answered)

    def _logged(self, record: Record, marks: StageMarks, span: Span | None, rows: int, answered: int) -> None:
        """Count, measure and trace a request whose record is in the log."""
        marks.logged = time.perf_counter_ns()
        self._traffic.add(record.model, record.version, record.role, record.latency_ns, not record.status, record.ood)
        if self._metrics is not None:
            self._metrics.request(record, marks.logged - answered)
        if span is not None and self._tracing is not None:
            self._tracing.finish(span, marks, record, rows)
