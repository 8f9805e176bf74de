"""Which items of a batch share a forward pass.

The ragged forward right-pads every row to the batch's longest chunk of new tokens, so one new session's
300-token prompt in a batch of 15 decode steps makes a 16 x 300 forward: 4,800 token rows for 315 real ones.
On a CPU a forward costs about a fixed part (reading the weights) plus a part per token row, so that batch is
far cheaper as two forwards, the prompt alone and the decode steps together (which also keeps them on the
decode fast path). Splitting has a price too, one more fixed part per forward, so small catch-ups stay with
the decode steps.

`forward_groups` partitions a batch to minimise  sum over forwards of (fixed_rows + rows x longest chunk),
the fixed part counted in token rows. Sorted by length, the best partition is contiguous, so a small
dynamic programme finds it exactly.
"""

from __future__ import annotations

# A forward's fixed cost in token rows. CPU (1.5B, fp32 prepacked, 200-token cache): 1 / 2 / 8 / 32 new tokens
# cost 205 / 232 / 331 / 724 ms, about 200 ms + 16 ms per row, so ~12 rows; with bf16 units rows are cheaper
# (AMX: 292 / 294 / 348 ms at 1 / 8 / 32), so more. On a GPU a forward's launch cost is worth hundreds of rows.
DEFAULT_FIXED_ROWS = {"cpu": 32, "cuda": 512}


def forward_groups(lengths: list[int], fixed_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices into `lengths` (new tokens per item), grouped into forwards: the cheapest partition under the
    cost model above whose forwards each hold at most `max_tokens` new tokens (an item longer than that goes
    alone). Groups come longest first; within a group, indices keep their batch order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[i]: cheapest cost of the i longest items
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        tokens = 0
        for j in range(i - 1, -1, -1):  # the last forward holds order[j:i]; its longest is order[j]
            tokens += lengths[order[j]]
            if tokens > max_tokens and j < i - 1:
                break
            cost = best[j] + fixed_rows + (i - j) * lengths[order[j]]
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups, i = [], n
    while i > 0:
        groups.append(sorted(order[cut[i]:i]))
        i = cut[i]
    return groups[::-1]
