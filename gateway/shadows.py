"""Shadow traffic: mirror a request to candidate versions after the primary answer is ready.

A shadow never delays or fails the primary: it starts on a later event-loop turn, its errors stay
in its own log record and counters, and at most `shadows.max_concurrency` shadow calls run at
once; beyond that (or when the request log is backed up) the shadow is shed and counted, never
queued without bound. Each shadow's output is compared with the primary's, per (model, primary
version, shadow version) pair: integer outputs must be equal, float outputs close
(rtol 1e-3, atol 1e-5); the first output decides (the label, for classifiers). A shadow gets the
request's inputs by its own input names, checked against its own signature: a version loaded with
another signature fails in its record (FAILED_PRECONDITION), not in its batcher.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np
from opentelemetry.trace import Span

from gateway.errors import FailedPrecondition, GatewayError, InvalidArgument
from gateway.repository import ModelRepository, ModelVersion
from gateway.requestlog.record import ROLE_SHADOW, Record, Tensor
from gateway.requestlog.writer import LogWriter
from gateway.runtime import check_input
from gateway.stats import Traffic
from gateway.telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass
class Agreement:
    compared: int = 0
    agreed: int = 0
    shed: int = 0
    failed: int = 0

    @property
    def rate(self) -> float:
        return self.agreed / self.compared if self.compared else 0.0


def outputs_agree(primary: list[np.ndarray], shadow: list[np.ndarray], rtol: float = 1e-3) -> bool:
    """Same first output: equal labels (integer outputs), or floats within relative difference `rtol`
    (a regressor's answers agree when |shadow - primary| <= rtol * |primary|, plus a tiny absolute slack)."""
    if not primary or not shadow or primary[0].shape != shadow[0].shape:
        return False
    a, b = primary[0], shadow[0]
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return bool(np.allclose(b, a, rtol=rtol, atol=1e-5, equal_nan=True))
    return bool(np.array_equal(a, b))


def shadow_feeds(
    version: ModelVersion, inputs: dict[str, np.ndarray], datatypes: dict[str, str]
) -> dict[str, np.ndarray]:
    """The shadow's feeds, by its own input names, checked as a request is: versions loaded at startup or
    with --force-signature may not take the primary's inputs."""
    assert version.model is not None
    differs = f"shadow: model {version.name!r} version {version.version!r} does not take the primary's request"
    try:
        for spec in version.model.inputs:
            if spec.name not in inputs:
                raise InvalidArgument(f"inputs: missing input {spec.name!r}; the request has {list(inputs)}")
            check_input(spec, inputs[spec.name], datatypes[spec.name], version.serving.reject_non_finite)
    except InvalidArgument as e:
        raise FailedPrecondition(f"{differs}: {e.message}") from e
    return {spec.name: inputs[spec.name] for spec in version.model.inputs}


class ShadowRunner:
    def __init__(
        self,
        repository: ModelRepository,
        request_log: LogWriter | None,
        max_concurrency: int,
        traffic: Traffic,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._repository = repository
        self._traffic = traffic
        self._log = request_log
        self._max = max_concurrency
        self._tracing = telemetry.tracing if telemetry is not None else None
        self._metrics = telemetry.metrics if telemetry is not None else None
        self._running: set[asyncio.Task[None]] = set()
        self.agreement: dict[tuple[str, str, str], Agreement] = {}

    def mirror(
        self,
        primary: Record,
        shadows: tuple[str, ...],
        feeds: dict[str, np.ndarray],
        datatypes: dict[str, str],
        rows: int,
        primary_outputs: list[np.ndarray],
        primary_span: Span | None = None,
    ) -> None:
        """Start the shadow calls for one answered request (returns at once)."""
        for version in shadows:
            stat = self.agreement.setdefault((primary.model, primary.version, version), Agreement())
            log_full = self._log is not None and self._log.queue_depth >= self._log.max_pending
            if len(self._running) >= self._max or log_full:
                stat.shed += 1
                continue
            task = asyncio.get_running_loop().create_task(
                self._run(primary, version, feeds, datatypes, rows, primary_outputs, stat, primary_span)
            )
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(
        self,
        primary: Record,
        version_name: str,
        feeds: dict[str, np.ndarray],
        datatypes: dict[str, str],
        rows: int,
        primary_outputs: list[np.ndarray],
        stat: Agreement,
        primary_span: Span | None,
    ) -> None:
        start = time.perf_counter_ns()
        record = Record(
            f"{primary.id}/shadow/{version_name}",
            time.time_ns(),
            primary.model,
            version_name,
            role=ROLE_SHADOW,
            primary_id=primary.id,
            caller=primary.caller,
            routing_key=primary.routing_key,
            trace_id=primary.trace_id,
            inputs=primary.inputs,
        )
        version: ModelVersion | None = None
        try:
            version = self._repository.get_ready(primary.model, version_name)
            record.sha256 = version.sha256
            assert version.batcher is not None and version.model is not None
            own_feeds = shadow_feeds(version, feeds, datatypes)
            version.in_flight += 1  # an unload waits for this call
            try:
                outputs = await version.batcher.run(own_feeds, rows)
            finally:
                version.in_flight -= 1
            record.outputs = [
                Tensor.of(spec.name, spec.dtype.v2_name, array)
                for spec, array in zip(version.model.outputs, outputs, strict=True)
            ]
            stat.compared += 1
            stat.agreed += outputs_agree(primary_outputs, outputs, version.serving.agreement_rtol)
            # The batcher counted this call's queue and compute; Triton statistics need its outcome too
            # (success.count == queue.count, which perf_analyzer checks), as a primary call records it.
            version.stats.record_request(rows, time.perf_counter_ns() - start, ok=True)
        except GatewayError as error:
            stat.failed += 1
            if version is not None:
                version.stats.record_request(rows, time.perf_counter_ns() - start, ok=False)
            record.status, record.message = int(error.code.value[0]), error.message
        record.latency_ns = time.perf_counter_ns() - start
        if self._log is not None:
            try:
                await self._log.commit(record)
            except GatewayError as error:
                log.warning("shadow record %s not logged: %s", record.id, error.message)
        self._traffic.add(record.model, record.version, record.role, record.latency_ns, not record.status, None)
        if self._metrics is not None:
            self._metrics.request(record, 0)
        if self._tracing is not None and primary_span is not None:
            self._tracing.shadow(primary_span.get_span_context(), record)

    async def drain(self) -> None:
        """Let running shadow calls finish (at shutdown, before the log closes)."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
