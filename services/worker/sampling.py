"""Next-token choice with per-request sampling parameters.

Seeded sampling draws from a generator keyed by (seed, position), so a token depends only on the
request and its position, never on which other sessions shared the batch or on which worker ran it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 0.0   # 0 = off
    top_k: int = 0       # 0 = off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @classmethod
    def from_proto(cls, msg) -> "Sampling":
        return cls(temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k,
                   seed=msg.seed if msg.HasField("seed") else None)


def validate(s: Sampling) -> str | None:
    """A readable reason the parameters are invalid, or None."""
    if not (0.0 <= s.temperature < float("inf")):  # also refuses NaN
        return f"temperature must be a finite number >= 0, got {s.temperature}"
    if s.top_p != 0.0 and not (0.0 < s.top_p <= 1.0):
        return f"top_p must be in (0, 1], got {s.top_p}"
    if s.top_k < 0:
        return f"top_k must be >= 0, got {s.top_k}"
    return None


def _generator(seed: int | None, position: int, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    # Mix seed and position into one 63-bit value (splitmix-style constants keep nearby pairs apart).
    gen.manual_seed((seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) % (1 << 63))
    return gen


def _filtered_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    scores = logits / s.temperature
    if s.top_k > 0 and s.top_k < scores.numel():
        kth = torch.topk(scores, s.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0.0 < s.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token when the ones before it already reach top_p (the first token always stays).
        drop_sorted = (cum - sorted_scores.softmax(-1)) >= s.top_p
        scores = scores.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return scores.softmax(-1)


def choose_tokens(logits: torch.Tensor, params: list[Sampling], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B] long, logprobs [B] float) under each row's parameters.
    `positions[i]` is the position of the token being chosen (for seeded draws)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    tokens = torch.argmax(logits, dim=-1)
    for i, s in enumerate(params):
        if s.greedy:
            continue
        probs = _filtered_probs(logits[i], s)
        gen = _generator(s.seed, positions[i], logits.device)
        tokens[i] = torch.multinomial(probs, 1, generator=gen)[0]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
    return tokens, logprobs
