"""Generated protobuf/gRPC code for protos/r2r/v1 (see codegen.py)."""
