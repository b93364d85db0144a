"""Generate the gRPC stubs in gateway/_proto from protos/*.proto, or check they are current.

The stubs are committed so that `pip install` needs no protoc. `--check` compares the
descriptors protoc produces now with the ones embedded in the committed stubs (not the file
text, which varies with the grpcio-tools version), so CI fails when a .proto was edited and the
stubs were not regenerated.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PACKAGE_PATH = "gateway/_proto"


def _protoc(*args: str) -> None:
    from grpc_tools import protoc  # build-time only dependency

    include = str(Path(protoc.__file__).parent / "_proto")
    code = protoc.main(["grpc_tools.protoc", f"-I{PACKAGE_PATH}={PROTO_DIR}", f"-I{include}", *args])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate() -> None:
    files = [str(p) for p in proto_files()]
    _protoc(f"--python_out={ROOT}", f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", *files)


def _without_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """Drop json_name, which protoc adds to descriptor sets but not to generated modules."""

    def strip(message: descriptor_pb2.DescriptorProto) -> None:
        for field in message.field:
            field.ClearField("json_name")
        for nested in message.nested_type:
            strip(nested)

    copy = descriptor_pb2.FileDescriptorProto()
    copy.CopyFrom(file)
    for message in copy.message_type:
        strip(message)
    return copy


def stale_stubs() -> list[str]:
    """Names of .proto files whose committed stub does not match the .proto source."""
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for proto in proto_files():
            out = Path(tmp) / f"{proto.stem}.pb"
            _protoc(f"--descriptor_set_out={out}", str(proto))
            fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
            try:
                module = importlib.import_module(f"gateway._proto.{proto.stem}_pb2")
            except ImportError:
                stale.append(proto.name)
                continue
            committed = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
            if _without_json_names(committed) != _without_json_names(fresh):
                stale.append(proto.name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        if stale:
            print(f"stale stubs for {', '.join(stale)}: run `python -m gateway.protogen`", file=sys.stderr)
            return 1
        print("stubs are current")
        return 0
    generate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
