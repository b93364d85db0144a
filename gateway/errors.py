"""The one error family of the gateway, each carrying the gRPC status a caller can act on.

Everything below the servicer raises these; the servicer maps them to a status in one place.
"""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    """An error with a gRPC status code and a message naming the offending field and value."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GatewayError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(GatewayError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


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
