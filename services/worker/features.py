"""The router's features, taken from the SLM at the step where it proposes a token."""

from __future__ import annotations

import torch

from r2r_serve.common.tensors import to_proto
from r2r_serve.proto import common_pb2


def router_features(logits: torch.Tensor, hidden: torch.Tensor, tokens: torch.Tensor,
                    embedding: torch.nn.Embedding, top_k: int, dtype: torch.dtype) -> list[common_pb2.RouterFeatures]:
    """logits [B, V], hidden [B, H] (final-norm output), tokens [B] -> one RouterFeatures per row."""
    work = logits.double() if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(work, dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp).nan_to_num().sum(-1)  # 0 * -inf -> 0
    top1 = probs.max(-1).values
    topk = torch.topk(work, min(top_k, work.shape[-1]), dim=-1).values
    emb = embedding(tokens.to(embedding.weight.device))
    out = []
    for i in range(logits.shape[0]):
        f = common_pb2.RouterFeatures(token_id=int(tokens[i]), entropy=float(entropy[i]),
                                      top1_prob=float(top1[i]), vocab_size=logits.shape[-1])
        to_proto(hidden[i].to(dtype), f.hidden_state)
        to_proto(topk[i].to(dtype), f.topk_logits)
        to_proto(emb[i].to(dtype), f.token_embedding)
        out.append(f)
    return out
