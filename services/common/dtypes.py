"""A worker's dtype policy: one dtype, or one for short forwards and another for long ones.

On CPUs without bf16 matrix instructions (AVX2 only) neither dtype wins everywhere: a decode step is
memory-bound, and bf16 weights (half the bytes) make it ~1.8x cheaper than fp32; a forward over many
token rows is compute-bound, and there bf16 (converted in software) costs ~4x more than fp32
(bench/forward_costs.py: 0.5B over a 200-token cache, k new tokens, ms — fp32 127/123/210/242/215/246
for decode/k=1/2/4/8/16, bf16 70/70/103/179/317/598). A split policy keeps both copies of the weights and
runs each forward in the cheaper one: `DECODE/PREFILL`, e.g. "bfloat16/float32" — forwards with fewer
than `prefill_from_tokens` token rows (decode steps, short catch-ups) in bf16, longer ones (prompt
prefills, long catch-ups, wide decode batches) in fp32. The KV cache is kept in the decode dtype (the
dtype of most forwards, and half the memory); a forward in the other dtype reads a cast copy of it.
With the fp32 copy on prepacked weights (worker/prepack.py, the CPU default) fp32 wins from 2 rows on.
"""

from __future__ import annotations

from dataclasses import dataclass

from r2r_serve.common.tensors import DTYPES_BY_NAME

# Where PREFILL starts to win on an AVX2 CPU (both default models, bench/forward_costs.py, a 200-token
# cache): dense fp32 from 8 rows (bf16 wins at 4), prepacked fp32 from 2 rows (1.5B: 273 vs 303 ms at 2
# rows; bf16 180 vs 248 at 1). Over int8 decode weights (--quantize int8-weight) the decode copy is cheaper
# still: prepacked fp32 from 16 rows (1.5B int8 540 vs 729 ms at 8 rows, 986 vs 970 at 16; 0.5B 364 vs 388
# at 16, 637 vs 514 at 32).
DENSE_PREFILL_FROM_TOKENS = 6
PREPACKED_PREFILL_FROM_TOKENS = 2
INT8_DECODE_PREFILL_FROM_TOKENS = 16


def default_prefill_from_tokens(prepacked_prefill: bool, int8_decode: bool = False) -> int:
    """The measured crossover for a split policy, by how each copy of the weights is held."""
    if int8_decode:
        return INT8_DECODE_PREFILL_FROM_TOKENS
    return PREPACKED_PREFILL_FROM_TOKENS if prepacked_prefill else DENSE_PREFILL_FROM_TOKENS


@dataclass(frozen=True)
class DtypePolicy:
    decode: str   # forwards of fewer than prefill_from_tokens rows; the KV cache's dtype
    prefill: str  # forwards of at least prefill_from_tokens rows

    @property
    def split(self) -> bool:
        return self.decode != self.prefill

    def __str__(self) -> str:
        return f"{self.decode}/{self.prefill}" if self.split else self.decode


def parse_dtype_policy(spec: str) -> DtypePolicy:
    """'float32' (one dtype) or 'DECODE/PREFILL' ('bfloat16/float32'); ValueError naming the choices."""
    parts = spec.split("/")
    if len(parts) > 2 or not all(p in DTYPES_BY_NAME for p in parts):
        raise ValueError(f"dtype {spec!r} is not understood: use one of {', '.join(DTYPES_BY_NAME)}, or "
                         "DECODE/PREFILL (e.g. bfloat16/float32: short forwards in bf16, long ones in fp32)")
    return DtypePolicy(parts[0], parts[-1])


def dtype_policy_arg(spec: str) -> str:
    """argparse `type=` for --dtype flags: the spec, checked (argparse shows the ValueError's message)."""
    import argparse

    try:
        return str(parse_dtype_policy(spec))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
