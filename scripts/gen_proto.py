"""Regenerate the Python protobuf/gRPC modules from proto/ (run after editing a .proto).

The .proto files live under proto/streamscore/v1/ (path mirrors the proto package
streamscore.v1); the generated modules land in streamscore/_proto/v1/ so that their
own imports (``from streamscore._proto.v1 import ...``) resolve inside our package
without colliding with any other distribution's top-level name.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto" / "streamscore"
OUT = ROOT


def generate(out: Path = OUT) -> list[Path]:
    sources = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        # Virtual path mapping: proto/streamscore/v1/x.proto is compiled as
        # streamscore/_proto/v1/x.proto, which fixes the generated import paths.
        f"-Istreamscore/_proto={PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--pyi_out={out}",
        *[f"streamscore/_proto/{src.relative_to(PROTO_ROOT)}" for src in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = out / "streamscore" / "_proto"
    for package in [generated, *[p for p in generated.rglob("*") if p.is_dir()]]:
        if package.name != "__pycache__":
            (package / "__init__.py").touch()
    return sorted(p for p in generated.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(path)
