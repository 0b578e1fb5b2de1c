#!/usr/bin/env python3
"""Generate the Python protobuf/gRPC modules of protos/ into one package.

Usage: genproto.py PROTO_DIR OUT_PACKAGE_DIR

grpc_tools writes `import common_pb2` for `import "common.proto"`; this
rewrites such lines to package-relative imports so that the generated code
lives in one importable package (no sys.path tricks) and cannot collide with
other packages' top-level `*_pb2` modules.

health_check.proto declares the standard grpc.health.v1 messages, which the
grpcio-health-checking package (the servicer consensus.py serves) registers in
protobuf's descriptor pool already; a second copy of the same symbols would
make importing both fail ("duplicate symbol"). So health_check_pb2 and its
_grpc module are written as aliases of grpc_health.v1's modules: the same
names (HealthCheckRequest, HealthStub, ...), one registration.
"""
import pathlib
import re
import shutil
import sys
import tempfile

from grpc_tools import protoc

HEALTH_PB2 = '''"""grpc.health.v1 messages: an alias of grpc_health.v1.health_pb2 (see scripts/genproto.py)."""
from grpc_health.v1.health_pb2 import DESCRIPTOR, HealthCheckRequest, HealthCheckResponse  # noqa: F401
'''
HEALTH_PB2_GRPC = '''"""grpc.health.v1.Health: an alias of grpc_health.v1.health_pb2_grpc (see scripts/genproto.py)."""
from grpc_health.v1.health_pb2_grpc import (  # noqa: F401
    Health,
    HealthServicer,
    HealthStub,
    add_HealthServicer_to_server,
)
'''


def main(proto_dir: str, out_dir: str) -> int:
    src = pathlib.Path(proto_dir)
    out = pathlib.Path(out_dir)
    protos = sorted(str(p.relative_to(src)) for p in src.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{src}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        # grpc_tools bundles the well-known types' include path
        args.insert(1, "-I" + str(pathlib.Path(protoc.__file__).parent / "_proto"))
        if protoc.main(args) != 0:
            print("protoc failed", file=sys.stderr)
            return 1
        names = {p.stem for p in pathlib.Path(tmp).glob("*.py")}
        pattern = re.compile(r"^import (\w+_pb2)( as \w+)?$", re.M)

        def relative(m: re.Match) -> str:
            return f"from . import {m.group(1)}{m.group(2) or ''}" if m.group(1) in names else m.group(0)

        staged = pathlib.Path(tmp) / "pkg"
        staged.mkdir()
        for f in pathlib.Path(tmp).glob("*.py"):
            (staged / f.name).write_text(pattern.sub(relative, f.read_text()))
        if (staged / "health_check_pb2.py").exists():
            (staged / "health_check_pb2.py").write_text(HEALTH_PB2)
            (staged / "health_check_pb2_grpc.py").write_text(HEALTH_PB2_GRPC)
        (staged / "__init__.py").write_text(
            '"""Generated from protos/ by scripts/genproto.py; do not edit."""\n')
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staged, out)
    print(f"generated {len(protos)} protos into {out}/")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
