"""A requested LLM share -> a router threshold, through the router's calibration curve.

A trained router's checkpoint stores (threshold, recall, LLM share) measured on its validation data; the
share falls as the threshold rises. A request may ask for a share instead of a raw threshold (`llm_share`);
between calibrated points the threshold is interpolated linearly, outside them it is clamped to the ends.
"""

from __future__ import annotations

import math

NEVER = 2.0   # a threshold above 1: no token is routed
ALWAYS = 0.0  # every token is routed


def threshold_for_share(curve, share: float, strategy: str = "this router") -> float:
    """`curve`: points with .threshold and .llm_share (any order)."""
    if math.isnan(share) or not 0.0 <= share <= 1.0:
        raise ValueError(f"llm_share must be between 0 and 1, got {share}")
    if share == 0.0:
        return NEVER
    if share == 1.0:
        return ALWAYS
    points = sorted({(float(p.llm_share), float(p.threshold)) for p in curve})
    if not points:
        raise ValueError(f"the router ({strategy}) has no calibration curve, so a request cannot ask for an "
                         "llm_share; send a threshold instead (or serve a trained router)")
    if share <= points[0][0]:
        return points[0][1]
    if share >= points[-1][0]:
        return points[-1][1]
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if s0 <= share <= s1:
            return t0 if s1 == s0 else t0 + (t1 - t0) * (share - s0) / (s1 - s0)
    return points[-1][1]  # unreachable: the loop covers [first, last]
