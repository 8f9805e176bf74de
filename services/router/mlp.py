"""The neural router (R2R, Fu et al. 2025): a small MLP over the SLM's own signals at one step.

Inputs: last-layer hidden state [H], top-k logits [K] (sorted desc), input embedding of the SLM's
chosen token [H]. Each is normalized and projected to `width`, the three are concatenated and fused,
a few pre-norm residual blocks follow, and one logit comes out (P(divergent) = sigmoid(logit)).
It runs on every token on CPU, so it is kept tiny: ~300k parameters for H=896 at the default width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from r2r_serve.router.features import FeatureBatch

# Top-k logits enter as gaps below the top-1 logit, clamped and scaled to roughly [-1, 0].
_GAP_CLAMP = 40.0
_GAP_SCALE = 1.0 / 10.0


@dataclass(frozen=True)
class RouterConfig:
    hidden_size: int
    top_k: int
    width: int = 128
    depth: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("hidden_size", "top_k", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"router config: {name} must be >= 1, got {getattr(self, name)}")
        if self.depth < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"router config: need depth >= 0 and dropout in [0, 1), got {self.depth}, {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RouterConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"router config has unknown fields {unknown}")
        return cls(**d)


class ResidualBlock(nn.Module):
    """Pre-norm MLP block: x + W2 · drop(gelu(W1 · LN(x)))."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.drop(nn.functional.gelu(self.fc1(self.norm(x)))))


class RouterMLP(nn.Module):
    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        h, k, w = config.hidden_size, config.top_k, config.width
        self.hidden_in = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, w))
        self.embed_in = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, w))
        # No per-row LayerNorm on the logits: it would erase their scale, i.e. the SLM's confidence.
        self.topk_in = nn.Linear(k, w)
        self.fuse = nn.Sequential(nn.GELU(), nn.Linear(3 * w, w))
        self.blocks = nn.ModuleList(ResidualBlock(w, config.dropout) for _ in range(config.depth))
        self.head = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, 1))

    def forward(self, batch: FeatureBatch) -> torch.Tensor:
        """Logits [B] (float32) for a FeatureBatch."""
        if batch.hidden_size != self.config.hidden_size or batch.top_k != self.config.top_k:
            raise ValueError(f"features have hidden_size={batch.hidden_size}, top_k={batch.top_k}; this router "
                             f"expects hidden_size={self.config.hidden_size}, top_k={self.config.top_k}")
        return self.forward_tensors(batch.hidden, batch.topk_logits, batch.token_embedding)

    def forward_tensors(self, hidden: torch.Tensor, topk_logits: torch.Tensor,
                        token_embedding: torch.Tensor) -> torch.Tensor:
        dtype = self.head[1].weight.dtype
        gaps = (topk_logits - topk_logits[:, :1]).clamp(min=-_GAP_CLAMP) * _GAP_SCALE
        x = torch.cat([self.hidden_in(hidden.to(dtype)), self.topk_in(gaps.to(dtype)),
                       self.embed_in(token_embedding.to(dtype))], dim=-1)
        x = self.fuse(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x).squeeze(-1)

    @torch.inference_mode()
    def predict_proba(self, batch: FeatureBatch) -> torch.Tensor:
        """P(divergent) [B] float32. Callers put the model in eval() (dropout off)."""
        return torch.sigmoid(self.forward(batch))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
