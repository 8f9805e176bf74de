"""A plain, in-process R2R loop: the specification the services are checked against.

No KV cache, no batching, no gRPC: every step runs both models over the whole sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from r2r_serve.router.features import FeatureBatch


@dataclass
class ReferenceRun:
    tokens: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)


def slm_features(slm, ids: list[int], top_k: int) -> tuple[int, FeatureBatch]:
    """The SLM's greedy proposal after `ids` and the router features of that step."""
    x = torch.tensor([ids], device=slm.device)
    hidden = slm.model(x).last_hidden_state[0, -1]           # final-norm output
    logits = slm.lm_head(hidden).double()
    token = int(torch.argmax(logits))
    logp = torch.log_softmax(logits, -1)
    entropy = float(-(logp.exp() * logp).sum())
    batch = FeatureBatch(
        hidden=hidden[None].float().cpu(), topk_logits=torch.topk(logits, top_k).values[None].float().cpu(),
        token_embedding=slm.get_input_embeddings().weight[token][None].float().cpu(),
        token_ids=torch.tensor([token]), entropy=torch.tensor([entropy], dtype=torch.float64),
        top1_prob=torch.tensor([float(logp.exp().max())], dtype=torch.float64), vocab_size=logits.shape[-1])
    return token, batch


@torch.inference_mode()
def reference_r2r(slm, llm, prompt: list[int], max_new: int, threshold: float, strategy, top_k: int,
                  eos: set[int]) -> ReferenceRun:
    ids, run = list(prompt), ReferenceRun()
    for _ in range(max_new):
        token, feats = slm_features(slm, ids, top_k)
        source, p = "slm", -1.0
        if threshold <= 0 or threshold <= 1:
            if threshold > 0:
                # The service sends P and the threshold as float32: compare the same way.
                p = float(np.float32(strategy.score(feats)[0]))
            if threshold <= 0 or p >= float(np.float32(threshold)):
                token = int(torch.argmax(llm(torch.tensor([ids], device=llm.device)).logits[0, -1]))
                source = "llm"
        if token in eos:
            break
        ids.append(token)
        run.tokens.append(token)
        run.sources.append(source)
        run.probabilities.append(p)
    return run


@dataclass
class VerifyRun(ReferenceRun):
    verify_passes: int = 0
    rollbacks: int = 0
    discarded_tokens: int = 0
    judged_probabilities: list[float] = field(default_factory=list)  # the LLM's P of each SLM token it judged
    judged_disagreements: list[float] = field(default_factory=list)  # ... of those it would not have written


@torch.inference_mode()
def reference_r2r_verify(slm, llm, prompt: list[int], max_new: int, threshold: float, strategy, top_k: int,
                         eos: set[int], rollback_below: float, max_draft: int = 0,
                         min_draft_prob: float = 0.0) -> VerifyRun:
    """The R2R loop in verify mode (services/coordinator/verify.py), plainly: at each routed token the LLM
    judges the SLM tokens it has not read; the first it gives P < rollback_below and would not have chosen is
    replaced by its choice and the rest is dropped. Once `max_draft` (> 0) SLM tokens wait unjudged, the LLM
    writes the next token without asking the SLM, judging them; where the SLM gives its proposal less than
    `min_draft_prob` (> 0) the LLM writes that position without asking the router. Before the answer ends the
    LLM judges the tail (and an SLM-proposed EOS). Greedy, no stop strings."""
    ids, run, P = list(prompt), VerifyRun(), len(prompt)
    verified = P
    # The coordinator gets rollback_below and the logprobs as float32: compare the same way.
    below = float(np.float32(rollback_below))
    limit = math.log(below) if below < 1 else None
    # The SLM's logprob reaches the coordinator as float32, min_draft_prob too.
    doubt = math.log(float(np.float32(min_draft_prob))) if min_draft_prob > 0 else None

    def append(token, source, p):
        ids.append(token)
        run.tokens.append(token)
        run.sources.append(source)
        run.probabilities.append(p)

    def judge(seq: list[int]):
        """The LLM reads `seq`: (its next token, the first rejected position and its choice there or None)."""
        nonlocal verified
        logits = llm(torch.tensor([seq], device=llm.device)).logits[0].double()
        if verified < len(seq):
            run.verify_passes += 1
        for j in range(verified, len(seq)):
            logp = torch.log_softmax(logits[j - 1], -1)
            choice, lp = int(torch.argmax(logits[j - 1])), float(np.float32(logp[seq[j]]))
            run.judged_probabilities.append(math.exp(lp))
            if choice != seq[j]:
                run.judged_disagreements.append(math.exp(lp))
                if limit is None or lp < limit:
                    run.rollbacks += 1
                    run.discarded_tokens += len(seq) - j
                    del ids[j:], run.tokens[j - P:], run.sources[j - P:], run.probabilities[j - P:]
                    verified = j + 1
                    return None, (j, choice)
        verified = max(verified, len(seq))
        return int(torch.argmax(logits[-1])), None

    while True:
        final_token = None
        if len(ids) - P < max_new:
            if max_draft and len(ids) - verified >= max_draft:
                token, source, p = None, "llm", -1.0  # the draft is full
            else:
                token, feats = slm_features(slm, ids, top_k)
                source, p = "slm", -1.0
                if doubt is not None and float(np.float32(math.log(float(feats.top1_prob[0])))) < doubt:
                    source = "llm"  # the SLM doubts its proposal: the draft ends, the router is not asked
                elif threshold <= 1:
                    p = float(np.float32(strategy.score(feats)[0]))
                    if p >= float(np.float32(threshold)):
                        source = "llm"
            if source == "llm":
                llm_token, rollback = judge(ids)
                if rollback is not None:
                    (_, token), p = rollback, -1.0
                else:
                    token = llm_token
                    verified = len(ids) + 1
            if token not in eos:
                append(token, source, p)
                continue
            final_token = token if source == "slm" else None
        tail = ids + ([final_token] if final_token is not None else [])
        if verified < len(tail):
            _, rollback = judge(tail)
            if rollback is not None:
                if rollback[1] in eos:
                    break
                append(rollback[1], "llm", -1.0)
                continue
        break
    return run
