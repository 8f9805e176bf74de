"""The checked-in generated code must match protos/: regenerate and compare."""

from __future__ import annotations


from r2r_serve.proto import codegen


def test_generated_code_is_fresh(tmp_path):
    written = codegen.generate(tmp_path)
    assert {p.name for p in written} >= {"worker_pb2.py", "router_pb2_grpc.py", "coordinator_pb2.py"}
    stale = [p.name for p in written if p.read_bytes() != (codegen.OUT_DIR / p.name).read_bytes()]
    assert not stale, f"stale generated code {stale}: run `python -m r2r_serve.proto.codegen` and commit"
    extra = {p.name for p in codegen.OUT_DIR.glob("*_pb2*.py*")} - {p.name for p in written}
    assert not extra, f"generated files without a proto: {sorted(extra)}"
