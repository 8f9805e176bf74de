"""Threshold calibration on held-out scores: the threshold for a target recall of divergent tokens (the
paper's 0.95 by default) or for a target LLM-token share, the threshold -> (recall, LLM share) curve stored
in the checkpoint, and the metrics the README reports (recall, precision, AUC; the entropy baseline at
equal LLM share).

A token goes to the LLM when score >= threshold (the router service compares in float32, so returned
thresholds are rounded *down* to the next float32: the promised recall holds after that rounding too).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from r2r_serve.router.checkpoint import ThresholdPoint


def _arrays(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = torch.as_tensor(scores).double().cpu().numpy().reshape(-1)
    y = torch.as_tensor(labels).cpu().numpy().reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.shape[0]} scores for {y.shape[0]} labels")
    return s, y


def _f32_down(t: float) -> float:
    return float(np.nextafter(np.float32(t), np.float32(-np.inf)))


def threshold_for_recall(scores, labels, target: float = 0.95) -> float:
    """The largest threshold whose recall of divergent tokens (labels == 1) on this data is >= target."""
    s, y = _arrays(scores, labels)
    if not 0 < target <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target}")
    pos = np.sort(s[y])[::-1]
    if pos.size == 0:
        raise ValueError("no divergent tokens: recall is undefined")
    k = math.ceil(target * pos.size - 1e-9)
    return _f32_down(pos[k - 1])


def threshold_for_share(scores, target_share: float) -> float:
    """The smallest threshold that sends at most `target_share` of these tokens to the LLM."""
    s, _ = _arrays(scores, np.zeros(len(torch.as_tensor(scores).reshape(-1))))
    if not 0 <= target_share <= 1:
        raise ValueError(f"target share must be in [0, 1], got {target_share}")
    desc = np.sort(s)[::-1]
    k = int(math.floor(target_share * desc.size + 1e-9))
    if k >= desc.size:
        return 0.0
    t = float(np.nextafter(np.float32(desc[k]), np.float32(np.inf)))  # strictly above the (k+1)-th score
    return t


def rates(scores, labels, threshold: float) -> dict:
    s, y = _arrays(scores, labels)
    routed = s >= threshold
    tp = int((routed & y).sum())
    return {"threshold": float(threshold), "recall": tp / max(int(y.sum()), 1),
            "precision": tp / max(int(routed.sum()), 1), "llm_share": float(routed.mean()) if s.size else 0.0}


def auc(scores, labels) -> float:
    """ROC AUC (Mann-Whitney U with average ranks for ties)."""
    s, y = _arrays(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size)
    sorted_s = s[order]
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def threshold_curve(scores, labels, points: int = 64) -> list[ThresholdPoint]:
    """Thresholds at quantiles of the scores (plus the exact recall targets 0.8/0.9/0.95/0.99), each with its
    recall and LLM share on this data; sorted by threshold ascending (share and recall descending)."""
    s, y = _arrays(scores, labels)
    qs = np.quantile(s, np.linspace(0, 1, points)) if s.size else np.zeros(0)
    thresholds = {_f32_down(q) for q in qs}
    if y.any():
        thresholds |= {threshold_for_recall(s, y, r) for r in (0.8, 0.9, 0.95, 0.99)}
    for share in (0.05, 0.1, 0.15, 0.2, 0.3):
        thresholds.add(threshold_for_share(s, share))
    out = []
    for t in sorted(thresholds):
        r = rates(s, y, t)
        out.append(ThresholdPoint(threshold=round(t, 9) if round(t, 9) <= t else t,
                                  recall=round(r["recall"], 5), llm_share=round(r["llm_share"], 5)))
    return out


def threshold_for_share_from_curve(curve: list[ThresholdPoint], target_share: float) -> float:
    """For a request that asks for an LLM share instead of a raw threshold: the smallest stored threshold
    whose measured share is <= target_share (above the curve's largest threshold: nothing is routed)."""
    fitting = [p for p in curve if p.llm_share <= target_share]
    if not fitting:
        return max((p.threshold for p in curve), default=1.0) + 1e-6
    return min(p.threshold for p in fitting)


def entropy_baseline(features, labels, llm_share: float) -> dict:
    """The training-free entropy router (normalized entropy) at the same LLM share: its recall/precision."""
    from r2r_serve.router.strategies import EntropyStrategy

    scores = EntropyStrategy().score(features)
    t = threshold_for_share(scores, llm_share)
    return {**rates(scores, labels, t), "auc": auc(scores, labels)}
