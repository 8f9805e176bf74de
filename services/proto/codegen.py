"""Compile protos/r2r/v1/*.proto into this package (checked in; tests/test_protos.py fails when stale).

Run: python -m r2r_serve.proto.codegen
grpcio-tools writes absolute imports (`from r2r.v1 import common_pb2`); `r2r` is someone else's PyPI
name, so they are rewritten to this package.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "r2r" / "v1"
OUT_DIR = Path(__file__).resolve().parent
_IMPORT = re.compile(r"^from r2r\.v1 import (\w+_pb2)", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Generate *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto into out_dir."""
    from grpc_tools import protoc  # build-time only
    import grpc_tools

    protos = sorted(PROTO_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(grpc_tools.__file__).parent / "_proto"
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", *[str(p) for p in protos]]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + ", ".join(p.name for p in protos))
        written = []
        for src in sorted((Path(tmp) / "r2r" / "v1").glob("*_pb2*.py*")):
            text = _IMPORT.sub(r"from r2r_serve.proto import \1", src.read_text())
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(path)
