"""torch.Tensor <-> r2r.v1.Tensor (raw bytes + dtype + shape)."""

from __future__ import annotations

import numpy as np
import torch

from r2r_serve.proto import common_pb2

_TO_PROTO = {
    torch.float32: common_pb2.DTYPE_FLOAT32,
    torch.float16: common_pb2.DTYPE_FLOAT16,
    torch.bfloat16: common_pb2.DTYPE_BFLOAT16,
    torch.float64: common_pb2.DTYPE_FLOAT64,
}
_FROM_PROTO = {v: k for k, v in _TO_PROTO.items()}
_ITEMSIZE = {common_pb2.DTYPE_FLOAT32: 4, common_pb2.DTYPE_FLOAT16: 2, common_pb2.DTYPE_BFLOAT16: 2,
             common_pb2.DTYPE_FLOAT64: 8}

DTYPES_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES_BY_NAME)}") from None


def to_proto(tensor: torch.Tensor, out: common_pb2.Tensor | None = None) -> common_pb2.Tensor:
    out = out if out is not None else common_pb2.Tensor()
    t = tensor.detach().contiguous().cpu()
    out.dtype = _TO_PROTO[t.dtype]
    out.shape[:] = list(t.shape)
    # bf16 has no numpy dtype: ship its raw 16-bit patterns.
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    out.data = raw.numpy().tobytes()
    return out


def from_proto(msg: common_pb2.Tensor) -> torch.Tensor:
    """Decode; raises ValueError when dtype, shape and byte count disagree."""
    if msg.dtype not in _FROM_PROTO:
        raise ValueError(f"tensor has unknown dtype {msg.dtype}")
    shape = tuple(msg.shape)
    count = int(np.prod(shape)) if shape else 0
    if count * _ITEMSIZE[msg.dtype] != len(msg.data):
        raise ValueError(f"tensor of shape {list(shape)} and dtype {common_pb2.DType.Name(msg.dtype)} "
                         f"needs {count * _ITEMSIZE[msg.dtype]} bytes, got {len(msg.data)}")
    dtype = _FROM_PROTO[msg.dtype]
    if dtype == torch.bfloat16:
        arr = np.frombuffer(msg.data, dtype=np.int16).copy()
        return torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}[dtype]
    return torch.from_numpy(np.frombuffer(msg.data, dtype=np_dtype).copy()).reshape(shape)
