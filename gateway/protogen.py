"""Compile protos/*.proto into descriptor sets in gateway/_proto/, or check they are current.

We ship compiled descriptors, not protoc's generated Python: generated modules register their
messages in protobuf's process-wide default pool, where our `inference.*` names would collide
with tritonclient's identical ones in any process that imports both (our tests, a client app
embedding the gateway). `gateway.protocol` loads these descriptors into a private pool instead.

The descriptor sets are committed so `pip install` needs no protoc; `--check` fails when a
.proto was edited and not recompiled (run by the test command).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUTPUT_DIR = Path(__file__).resolve().parent / "_proto"


def _compile(proto: Path, output: Path) -> None:
    from grpc_tools import protoc  # build-time only dependency

    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}", "--include_imports"]
    code = protoc.main([*args, f"--descriptor_set_out={output}", str(proto)])
    if code != 0:
        raise SystemExit(f"protoc failed on {proto} with exit code {code}")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def descriptor_path(proto: Path) -> Path:
    return OUTPUT_DIR / f"{proto.stem}.binpb"


def generate() -> None:
    for proto in proto_files():
        _compile(proto, descriptor_path(proto))


def _parsed(path: Path) -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())


def stale_descriptors() -> list[str]:
    """Names of .proto files whose committed descriptor set does not match the source."""
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for proto in proto_files():
            fresh = Path(tmp) / "fresh.binpb"
            _compile(proto, fresh)
            committed = descriptor_path(proto)
            if not committed.exists() or _parsed(committed) != _parsed(fresh):
                stale.append(proto.name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compile protos/*.proto for gateway.protocol")
    parser.add_argument("--check", action="store_true", help="fail if committed descriptors are stale")
    args = parser.parse_args(argv)
    if not args.check:
        generate()
        return 0
    stale = stale_descriptors()
    if stale:
        print(f"stale descriptors for {', '.join(stale)}: run `python -m gateway.protogen`", file=sys.stderr)
        return 1
    print("compiled protos are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
