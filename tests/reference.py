"""A plain, in-process R2R loop: the specification the services are checked against.

No KV cache, no batching, no gRPC: every step runs both models over the whole sequence.
"""

from __future__ import annotations

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
