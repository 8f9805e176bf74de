"""Weight-only int8 linear layers for CPU decode steps (`--quantize int8-weight`).

A CPU decode step reads every weight once and is bound by memory bandwidth, so int8 weights (one scale per
output channel) make it cheaper while the activations stay in the model's dtype. On a 2-core AMX Xeon in
bf16: the 0.5B step went 99 -> 62 ms and the 1.5B step 224 -> 151 ms. Their greedy top-1 choice agreed with
the bf16 model at 96.9% / 97.8% of positions of code, against 98.2% / 98.8% for bf16 vs float32. Dynamic
int8 (`--quantize int8`) agrees at only 75-80%, because it also quantizes the activations.

PyTorch's int8 kernel dequantizes the weight on every call. From about 8 token rows it is slower than the
dense kernel: the 1.5B at 8 / 16 rows took 344 / 591 ms against 224 / 235 ms. So each layer keeps its dense
weight as well and picks a kernel by the rows of its input. Forwards of fewer than `max_rows` rows (decode
steps, small batches) run in int8; prefills and LLM catch-ups run dense and unchanged. The price is memory:
the dense weights plus half as much again in int8.
"""

from __future__ import annotations

import torch

DEFAULT_MAX_ROWS = 8   # measured crossover above: 4 rows still win in int8 (0.5B 79 vs 105 ms), 8 lose
_K_MULTIPLE = 16       # the CPU kernel's bf16 path crashes (SIGSEGV) on an input width that is not a multiple
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Int8WeightLinear(torch.nn.Module):
    """y = x W^T + b. Inputs of fewer than `max_rows` rows use int8 W and per-channel scales; others use dense W."""

    def __init__(self, linear: torch.nn.Linear, max_rows: int = DEFAULT_MAX_ROWS):
        super().__init__()
        self.in_features, self.out_features, self.max_rows = linear.in_features, linear.out_features, max_rows
        self.weight = linear.weight  # the same tensor: a tied head still shares it with the input embedding
        self.bias = linear.bias
        with torch.no_grad():
            w = linear.weight.detach().float()
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8),
                                 persistent=False)
            self.register_buffer("scales", scale.to(linear.weight.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows >= self.max_rows or x.dtype != self.scales.dtype:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, self.in_features), self.qweight, self.scales)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 below {self.max_rows} rows"


def int8_weights_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def supports(linear: torch.nn.Module) -> bool:
    return (type(linear) is torch.nn.Linear and linear.weight.device.type == "cpu"
            and linear.weight.dtype in _DTYPES and linear.in_features % _K_MULTIPLE == 0)


def quantize_int8_weights(model: torch.nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Replace every supported nn.Linear of `model` (the output head included) in place; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if supports(child):
                setattr(parent, name, Int8WeightLinear(child, max_rows))
                count += 1
    return count
