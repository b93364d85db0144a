"""Protocol messages, server handlers and client stubs, built from our compiled .proto files.

Messages live in a private descriptor pool (see `gateway.protogen` for why), so this module
replaces protoc's generated `_pb2`/`_pb2_grpc` modules: `inference.ModelInferRequest` is the
message class, `add_service` registers an implementation object whose methods are named after
the RPCs, and `Stub` is a client for tests, the demo and the CLI.
"""

from __future__ import annotations

from collections.abc import Collection
from importlib import resources
from types import SimpleNamespace
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import ServiceDescriptor

POOL = descriptor_pool.DescriptorPool()


def _load(name: str) -> SimpleNamespace:
    data = resources.files("gateway._proto").joinpath(f"{name}.binpb").read_bytes()
    namespace = SimpleNamespace()
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        POOL.Add(file)
        if file.name != f"{name}.proto":
            continue
        descriptor = POOL.FindFileByName(file.name)
        for message_name, message in descriptor.message_types_by_name.items():
            setattr(namespace, message_name, message_factory.GetMessageClass(message))
        for enum_name, enum in descriptor.enum_types_by_name.items():
            setattr(namespace, enum_name, {v.name: v.number for v in enum.values})
        for service_name, service in descriptor.services_by_name.items():
            setattr(namespace, service_name, service)
    return namespace


inference: Any = _load("inference")
admin: Any = _load("admin")


def _types(service: ServiceDescriptor, method_name: str) -> tuple[Any, Any]:
    method = service.methods_by_name[method_name]
    return (
        message_factory.GetMessageClass(method.input_type),
        message_factory.GetMessageClass(method.output_type),
    )


_HANDLERS = {  # (client streaming, server streaming) -> handler factory
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_service(
    server: grpc.aio.Server,
    service: ServiceDescriptor,
    implementation: object,
    hot: Collection[str] = (),
    raw: Collection[str] = (),
) -> None:
    """Register `implementation.<RpcName>` for every RPC of `service`; the `hot` RPCs are also registered
    with the gRPC core. The `raw` RPCs take the request's bytes and return the reply's bytes: they
    decode and encode messages themselves (the others get and return protobuf messages).

    A core-registered RPC is matched without a Python lookup, but grpc.aio's accept loop waits on one
    pending future per registered RPC for every call it accepts (`asyncio.wait` over all of them): with
    every RPC of every service registered (~48), that wait cost ~35 us more per call than with two, on
    every call, hot or not. So only the request path is registered; the rest is looked up by name.
    """
    handlers = {}
    for method in service.methods:
        request_type, response_type = _types(service, method.name)
        make = _HANDLERS[method.client_streaming, method.server_streaming]
        as_bytes = method.name in raw  # gRPC passes bytes through where (de)serializers are None
        handlers[method.name] = make(
            getattr(implementation, method.name),
            request_deserializer=None if as_bytes else request_type.FromString,
            response_serializer=None if as_bytes else response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    if hot:
        server.add_registered_method_handlers(service.full_name, {name: handlers[name] for name in hot})


class Stub:
    """A client for `service` on a sync or aio channel: `Stub(channel).ModelInfer(request)`."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel, service: ServiceDescriptor | None = None) -> None:
        service = service or inference.GRPCInferenceService
        for method in service.methods:
            request_type, response_type = _types(service, method.name)
            make = {
                (False, False): channel.unary_unary,
                (False, True): channel.unary_stream,
                (True, False): channel.stream_unary,
                (True, True): channel.stream_stream,
            }[method.client_streaming, method.server_streaming]
            callable_ = make(
                f"/{service.full_name}/{method.name}",
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
            setattr(self, method.name, callable_)

    def __getattr__(self, name: str) -> Any:  # for type checkers: methods are set per service
        raise AttributeError(name)
