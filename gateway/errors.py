"""The one error family of the gateway, each carrying the gRPC status a caller can act on.

Everything below the servicer raises these; the servicer maps them to a status in one place.
"""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    """An error with a gRPC status code and a message naming the offending field and value."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.limit = limit  # the configured limit that refused the request, counted by model in metrics


class InvalidArgument(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GatewayError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(GatewayError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, limit: str | None = None, retry_after_ms: int | None = None) -> None:
        super().__init__(message, limit)
        # When a retry may succeed: sent as gRPC's `grpc-retry-pushback-ms`, which clients with a retry
        # policy obey (gRFC A6) instead of retrying at once into the same full queue.
        self.retry_after_ms = retry_after_ms


class DeadlineExceeded(GatewayError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(GatewayError):
    code = grpc.StatusCode.CANCELLED


class Unavailable(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(GatewayError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GatewayError):
    code = grpc.StatusCode.PERMISSION_DENIED


class AlreadyExists(GatewayError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ModelExecutionError(GatewayError):
    code = grpc.StatusCode.INTERNAL


class ConfigError(Exception):
    """A configuration file or flag is wrong; raised at startup, never on the request path."""
