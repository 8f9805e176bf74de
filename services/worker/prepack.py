"""CPU float32 linear layers on oneDNN prepacked weights.

A plain float32 nn.Linear on the CPU re-lays-out (packs) its weight for the GEMM kernel on every call whose
input has more than one row, so a forward over 2-32 token rows pays about two extra passes over all the
weights: on a 2-core AVX2 machine the 1.5B model's 2-token forward costs 587 ms against 313 ms for one
token. Packing each weight once at load time (the layout PyTorch's inductor uses for frozen CPU graphs)
removes that: the same forward costs 273 ms, 8 tokens 735 -> 364 ms, 32 tokens 1140 -> 741 ms, and one
token 313 -> 248 ms (bench/forward_costs.py, variant fp32-packed). The math is float32 GEMM either way;
only the kernel's blocking differs.

Only float32 weights on the CPU are packed (oneDNN's bf16 path needs AVX512-BF16/AVX-NE-CONVERT, which
the CPUs that benefit lack, and float64 has no oneDNN kernel). A tied output head is left as it is:
packing it would duplicate the largest matrix, which the input embedding still needs in its plain form.
"""

from __future__ import annotations

import torch

BATCH_HINT = 32  # the row count oneDNN tunes the layout for; 1..256 rows all run well with it (measured)


class PrepackedLinear(torch.nn.Module):
    """y = x W^T + b with W held in oneDNN's packed layout (the original dense weight is dropped)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked"


def prepack_available() -> bool:
    """True when this torch build has oneDNN and its linear-prepack ops, and they compute a linear right."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        probe = torch.nn.Linear(64, 48)
        x = torch.randn(3, 64, generator=gen)
        with torch.inference_mode():
            return torch.allclose(PrepackedLinear(probe)(x), probe(x), rtol=1e-4, atol=1e-5)
    except (AttributeError, RuntimeError):  # ops missing from this build, or refused on this CPU
        return False


def prepack_linears(model: torch.nn.Module) -> int:
    """Replace every float32 CPU nn.Linear of `model` (a tied output head excepted) in place; returns how
    many were replaced."""
    config = getattr(model, "config", None)  # a bare module (a drafting head alone) has none
    tied = model.get_output_embeddings() if getattr(config, "tie_word_embeddings", False) else None
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is torch.nn.Linear and child is not tied and child.weight.dtype == torch.float32
                    and child.weight.device.type == "cpu"):
                setattr(parent, name, PrepackedLinear(child))
                count += 1
    return count
