"""Weight-only int8 linear layers for CPU decode steps (`--quantize int8-weight`).

A CPU decode step reads every weight once and is bound by memory bandwidth, so int8 weights (one scale per
output channel) make it cheaper while the activations stay in the model's dtype. On a 2-core AMX Xeon in
bf16: the 0.5B step went 99 -> 62 ms and the 1.5B step 224 -> 151 ms. Their greedy top-1 choice agreed with
the bf16 model at 96.9% / 97.8% of positions of code, against 98.2% / 98.8% for bf16 vs float32. Dynamic
int8 (`--quantize int8`) agrees at only 75-80%, because it also quantizes the activations.

Whether the int8 kernel also wins for long inputs depends on the CPU. Where it has bf16 units (AMX,
AVX512-BF16) the dense bf16 GEMM is fast, and from about 8 token rows it beats the int8 kernel (which
dequantizes the weight on every call): on a 2-core AMX Xeon the 1.5B at 8 / 16 rows took 344 / 591 ms in int8
against 224 / 235 ms dense. So there each layer keeps its dense weight as well and picks a kernel by the rows
of its input: fewer than `max_rows` (decode steps, small batches) in int8, longer forwards dense, at the price
of holding both (without a row limit the dense weights are dropped). On an AVX2-only CPU a bf16 GEMM costs
about one decode step per row and the int8 kernel beats it at every length (2-core AVX2 EPYC, 1.5B over a
200-token cache, 2 / 8 / 32 new tokens: 266 / 540 / 1832 ms against 447 / 1457 / 4795 ms dense bf16), so bf16
layers there have no row limit; with the bfloat16/float32 policy `auto` picks there, forwards from 16 rows go
to the fp32 copy (common/dtypes.py) and the int8 layers take the rest. The kernel is slow with float32
activations (one 8960x1536 layer at 8 rows: 141 ms against 18 ms dense fp32 on that EPYC), so float32 layers
keep the row limit everywhere.
"""

from __future__ import annotations

import torch

from r2r_serve.common import cpu

BF16_UNITS_MAX_ROWS = 8  # measured crossover on AMX: 4 rows still win in int8 (0.5B 79 vs 105 ms), 8 lose
_K_MULTIPLE = 16         # the CPU kernel's bf16 path crashes (SIGSEGV) on an input width that is not a multiple
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def default_max_rows(dtype: torch.dtype) -> int | None:
    """The int8 kernel's row limit for layers of `dtype` on this CPU: none (None) for bf16 layers on a CPU
    without bf16 units, else BF16_UNITS_MAX_ROWS."""
    return None if dtype == torch.bfloat16 and not cpu.has_bf16_units() else BF16_UNITS_MAX_ROWS


def describe_max_rows(max_rows: int | None) -> str:
    return f"below {max_rows} token rows" if max_rows is not None else "at every length"


class Int8WeightLinear(torch.nn.Module):
    """y = x W^T + b. Inputs of fewer than `max_rows` rows (any number if None) use int8 W and per-channel
    scales; longer ones the dense W. `max_rows` "auto": default_max_rows() for the layer's dtype.
    Without a row limit the dense W is dropped (it would never be read) unless `keep_dense`: a tied head
    keeps it, since the input embedding holds the same tensor anyway."""

    def __init__(self, linear: torch.nn.Linear, max_rows: int | None | str = "auto", keep_dense: bool = False):
        super().__init__()
        max_rows = default_max_rows(linear.weight.dtype) if max_rows == "auto" else max_rows
        self.in_features, self.out_features, self.max_rows = linear.in_features, linear.out_features, max_rows
        # the same tensor, not a copy: a tied head still shares it with the input embedding
        self.weight = linear.weight if keep_dense or max_rows is not None else None
        self.bias = linear.bias
        with torch.no_grad():
            w = linear.weight.detach().float()
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8),
                                 persistent=False)
            self.register_buffer("scales", scale.to(linear.weight.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.dtype != self.scales.dtype:  # the kernel takes activations in the scales' dtype only
            if self.weight is None:
                return self.forward(x.to(self.scales.dtype)).to(x.dtype)
            return torch.nn.functional.linear(x, self.weight, self.bias)
        if self.max_rows is not None and rows >= self.max_rows:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, self.in_features), self.qweight, self.scales)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int8 {describe_max_rows(self.max_rows)}")


def int8_weights_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def supports(linear: torch.nn.Module) -> bool:
    return (type(linear) is torch.nn.Linear and linear.weight.device.type == "cpu"
            and linear.weight.dtype in _DTYPES and linear.in_features % _K_MULTIPLE == 0)


def quantize_int8_weights(model: torch.nn.Module, max_rows: int | None | str = "auto") -> int:
    """Replace every supported nn.Linear of `model` (the output head included) in place; returns how many."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    shared = {id(embedding.weight)} if embedding is not None else set()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if supports(child):
                setattr(parent, name, Int8WeightLinear(child, max_rows, keep_dense=id(child.weight) in shared))
                count += 1
    return count
