"""The gRPC transport for the inference service: proto in, one call into the core, proto out.

Errors from below are one family (`GatewayError`); this module is the one place that turns them
into gRPC status codes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, NoReturn

import grpc

from gateway.auth import Identity, TokenStore, require
from gateway.codec import decode, encode, named
from gateway.errors import GatewayError, InvalidArgument, NotFound, ResourceExhausted, Unauthenticated
from gateway.inference import InferenceService
from gateway.lifecycle import ModelLifecycle
from gateway.protocol import inference as pb
from gateway.repository import ModelRepository, ModelVersion
from gateway.runtime import TensorSpec
from gateway.streaming import RequestStream
from gateway.tls import CertificateCaller
from router.rules import version_order

log = logging.getLogger(__name__)

SERVER_NAME = "canary-gateway"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["model_configuration", "statistics", "binary_tensor_data"]


def _server_version() -> str:
    try:
        return package_version(SERVER_NAME)
    except PackageNotFoundError:
        return "unknown"


RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRFC A6: how long a retrying client waits


async def reject(context: grpc.aio.ServicerContext, method: str, error: GatewayError) -> NoReturn:
    """End the call with `error`'s status (raises). Aborting sends a trailers-only answer: no headers or
    message first, which would commit the call, so a client's gRPC retry policy may retry it."""
    # A refusal by a limit gets no line of its own: under overload that would be a line per shed request,
    # written when CPU is scarcest; each is in the request log and counted by model and limit.
    if error.limit is None:
        log.info("%s rejected with %s: %s", method, error.code.name, error.message)
    trailers: tuple[tuple[str, str], ...] = ()
    if isinstance(error, ResourceExhausted) and error.retry_after_ms is not None:
        trailers = ((RETRY_PUSHBACK_KEY, str(error.retry_after_ms)),)
    await context.abort(error.code, error.message, trailers)
    raise AssertionError("grpc.aio's abort raises")  # its type stubs do not say so


Rpc = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def refusals_answered(method: Rpc) -> Rpc:
    """For an RPC method: a GatewayError it raises becomes the call's status and message.
    (ModelInfer, the hot path, handles its errors inline.)"""

    @functools.wraps(method)
    async def rpc(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except GatewayError as e:
            await reject(context, method.__name__, e)

    return rpc


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() value (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.dtype.v2_name, shape=spec.shape)


def _duration(count: int, ns: int) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=count, ns=ns)


class InferenceServicer:
    """Implements every RPC of `inference.GRPCInferenceService` (registered by `protocol.add_service`)."""

    def __init__(
        self,
        repository: ModelRepository,
        service: InferenceService,
        tokens: TokenStore,
        require_token: bool,
        stream_max_in_flight: int,
        lifecycle: ModelLifecycle,
        certificate_caller: CertificateCaller | None = None,
    ) -> None:
        self._repository = repository
        self._lifecycle = lifecycle
        self._service = service
        self._tokens = tokens
        self._require_token = require_token
        self._stream_max_in_flight = stream_max_in_flight
        self._certificate_caller = certificate_caller
        self._version = _server_version()
        self._stream_answers: set[asyncio.Task[Any]] = set()  # ModelStreamInfer requests running, all streams

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._repository.ready)

    @refusals_answered
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._repository.get(request.name, request.version).ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=EXTENSIONS)

    @refusals_answered
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        version = self._repository.get_ready(request.name, request.version)
        assert version.model is not None
        return pb.ModelMetadataResponse(
            name=version.name,
            versions=list(self._repository.versions_of(version.name)),
            platform=PLATFORM,
            inputs=[_tensor_metadata(s) for s in version.model.inputs],
            outputs=[_tensor_metadata(s) for s in version.model.outputs],
        )

    @refusals_answered
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        version = self._repository.get_ready(request.name, request.version)
        return pb.ModelConfigResponse(config=_model_config(version))

    @refusals_answered
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if not request.name:
            chosen = self._repository.all_versions()
        elif request.version:
            chosen = [self._repository.get(request.name, request.version)]
        else:
            chosen = list(self._repository.versions_of(request.name).values())
        return pb.ModelStatisticsResponse(model_stats=[_statistics(v) for v in chosen])

    def _caller(self, headers: dict[str, str], context: grpc.aio.ServicerContext) -> Identity | None:
        authorization = headers.get("authorization")
        if authorization is None:
            # A verified client certificate (mTLS) authenticates too: it names a caller without a token.
            caller = self._certificate_caller.identify(context) if self._certificate_caller is not None else None
            if caller is not None or not self._require_token:
                return caller
        return self._tokens.authenticate(authorization)

    async def ModelInfer(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """The request path takes and returns bytes (see `codec`); a refusal answers an empty message."""
        try:
            decoded = decode(data)
            headers = dict(context.invocation_metadata() or ())
            decoded.caller = self._caller(headers, context)
        except GatewayError as e:
            await reject(context, "ModelInfer", await self._log_unprocessed(data, e))
        decoded.headers = headers
        decoded.deadline = _deadline(context)
        try:
            response = await self._service.infer(decoded)
        except GatewayError as e:
            await reject(context, "ModelInfer", e)
        return encode(response)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Triton's streaming inference: every request gets one reply (its own error included) and the
        same routing, validation and logging as ModelInfer; the stream's metadata and deadline apply to all."""
        headers = dict(context.invocation_metadata() or ())
        deadline = _deadline(context)
        try:
            caller, refused = self._caller(headers, context), None
        except GatewayError as e:  # each request is still answered, and logged, with the refusal
            caller, refused = None, e

        async def answer(data: bytes) -> bytes:
            try:
                if refused is not None:
                    raise refused
                decoded = decode(data)
            except GatewayError as e:
                return _stream_error(data, await self._log_unprocessed(data, e))
            decoded.caller = caller
            decoded.headers = headers
            decoded.deadline = deadline
            try:
                response = await self._service.infer(decoded)
            except GatewayError as e:
                return _stream_error(data, e)
            return encode(response, stream=True)

        async for reply in RequestStream(answer, self._stream_max_in_flight, self._stream_answers).replies(requests):
            yield reply

    async def drain_streams(self) -> None:
        """Wait for streamed requests still running (their streams may have ended): at shutdown, after the
        server stopped and before the log closes, so each still gets its record."""
        while self._stream_answers:
            await asyncio.gather(*self._stream_answers, return_exceptions=True)

    def _repository_admin(self, context: grpc.aio.ServicerContext, action: str) -> Identity:
        identity = self._caller(dict(context.invocation_metadata() or ()), context)
        if identity is None:
            raise Unauthenticated(f"{action} needs an admin token (authorization: Bearer ...)")
        require(identity, "admin", action)
        return identity

    @refusals_answered
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        self._repository_admin(context, "RepositoryIndex")
        response = pb.RepositoryIndexResponse()
        loaded = self._repository.models
        on_disk = self._repository.on_disk()
        for name in sorted(set(on_disk) | set(loaded)):
            for version in sorted(set(on_disk.get(name, [])) | set(loaded.get(name, {})), key=version_order):
                found = loaded.get(name, {}).get(version)
                state, reason = (found.state, found.reason) if found is not None else ("UNAVAILABLE", "not loaded")
                if not request.ready or state == "READY":
                    response.models.add(name=name, version=version, state=state, reason=reason)
        return response

    @refusals_answered
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        identity = self._repository_admin(context, "RepositoryModelLoad")
        _refuse_overrides(request.parameters)
        versions = self._repository.on_disk().get(request.model_name)
        if not versions:
            raise NotFound(f"model_name: no model {request.model_name!r} in repository {self._repository.root}")
        loaded = self._repository.models.get(request.model_name, {})
        why = _reason(request.parameters, "RepositoryModelLoad")
        for version in versions:
            if version not in loaded or loaded[version].state == "FAILED":
                await self._lifecycle.load(request.model_name, version, who=identity.name, why=why)
        return pb.RepositoryModelLoadResponse()

    @refusals_answered
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        identity = self._repository_admin(context, "RepositoryModelUnload")
        why = _reason(request.parameters, "RepositoryModelUnload")
        await self._lifecycle.unload_model(request.model_name, who=identity.name, why=why)
        return pb.RepositoryModelUnloadResponse()

    async def _log_unprocessed(self, data: bytes, error: GatewayError) -> GatewayError:
        """Log a request refused before processing, with its bytes; return the error to answer with."""
        try:
            await self._service.reject_unprocessed(*named(data), error, data)
        except GatewayError as log_error:  # the log could not take the record: say so instead
            return log_error
        return error


def _refuse_overrides(parameters: Any) -> None:
    """Triton lets load_model send a config or model files; here versions come from the repository only."""
    for key in parameters:
        if key == "config" or key.startswith("file:"):
            raise InvalidArgument(
                f"parameters[{key}]: overriding the model's config or files is not supported; "
                "put the version in the model repository and load it from there"
            )


def _reason(parameters: Any, default: str) -> str:
    """The change-log reason: a `reason` string parameter, else the RPC's name."""
    if "reason" in parameters and parameters["reason"].string_param.strip():
        return str(parameters["reason"].string_param.strip())
    return default


def _stream_error(data: bytes, error: GatewayError) -> bytes:
    """One streamed request's failure: its status and message in `error_message`, its names in the reply."""
    model_name, model_version, id_ = named(data)
    if error.limit is None:  # as in `reject`: refusals by limits are logged and counted, not printed
        log.info("ModelStreamInfer request %r rejected with %s: %s", id_, error.code.name, error.message)
    reply = pb.ModelStreamInferResponse(error_message=f"{error.code.name}: {error.message}")
    reply.infer_response.id = id_
    reply.infer_response.model_name = model_name
    reply.infer_response.model_version = model_version
    return bytes(reply.SerializeToString())


def _model_config(version: ModelVersion) -> pb.ModelConfig:
    model = version.model
    assert model is not None
    # As in Triton: with batching, dims leave out the batch dimension; max_batch_size 0 means no batching
    # and dims that are the whole shape.
    batching = model.batchable and version.serving.max_batch_size > 0
    skip = 1 if batching else 0
    config = pb.ModelConfig(
        name=version.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=version.serving.max_batch_size if batching else 0,
        default_model_filename="model.onnx",
        input=[pb.ModelInput(name=s.name, data_type=s.dtype.triton_enum, dims=s.shape[skip:]) for s in model.inputs],
        output=[pb.ModelOutput(name=s.name, data_type=s.dtype.triton_enum, dims=s.shape[skip:]) for s in model.outputs],
    )
    if batching:
        config.dynamic_batching.max_queue_delay_microseconds = version.serving.max_batch_wait_us
    parameters = {
        "version": version.version,
        "sha256": version.sha256,
        "execution": "inline" if version.batcher and version.batcher.inline else "threaded",
        "ood_profile": _ood_profile_text(version),
        "ood_policy": version.serving.ood_policy,
        **version.provenance,
    }
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def _ood_profile_text(version: ModelVersion) -> str:
    """What ModelConfig says about OOD scoring: "none" (served unscored) or the profile's size and threshold."""
    if version.ood is None:
        return "none"
    profile = version.ood.profile
    return (
        f"{profile.n_features} features, threshold {profile.threshold:.4g} "
        f"(training quantile {profile.threshold_quantile:.4g}, {profile.n_rows} rows)"
    )


def _statistics(version: ModelVersion) -> pb.ModelStatistics:
    s = version.stats
    return pb.ModelStatistics(
        name=version.name,
        version=version.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success.count, s.success.ns),
            fail=_duration(s.fail.count, s.fail.ns),
            queue=_duration(s.queue.count, s.queue.ns),
            compute_input=_duration(s.compute_input.count, s.compute_input.ns),
            compute_infer=_duration(s.compute_infer.count, s.compute_infer.ns),
            compute_output=_duration(s.compute_output.count, s.compute_output.ns),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(d.count, d.ns))
            for size, d in sorted(s.batch_sizes.items())
        ],
    )
