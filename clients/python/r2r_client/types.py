"""Plain result types and request building shared by the async and sync clients."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

from r2r_serve.proto import common_pb2, coordinator_pb2

# A prompt: text (no template), chat messages [{"role", "content"}] (template applied) or token ids.
Prompt = Union[str, Sequence[dict], Sequence[int]]

PROVENANCE = {common_pb2.PROVENANCE_SLM: "slm", common_pb2.PROVENANCE_LLM: "llm"}
FINISH = {coordinator_pb2.FINISH_REASON_LENGTH: "length", coordinator_pb2.FINISH_REASON_STOP: "stop",
          coordinator_pb2.FINISH_REASON_EOS: "eos", coordinator_pb2.FINISH_REASON_CANCELLED: "cancelled"}


@dataclass
class Token:
    index: int
    token_id: int
    text: str
    source: str                 # "slm" or "llm"
    logprob: float | None
    router_probability: float | None


@dataclass
class Stats:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    llm_tokens: int
    llm_share: float
    time_to_first_token_s: float
    total_s: float
    tokens_per_s: float
    stop_sequence: str
    text_tail: str = ""
    verify_passes: int = 0      # verify mode: LLM passes that judged SLM tokens,
    rollbacks: int = 0          # the rollbacks they made,
    discarded_tokens: int = 0   # and the SLM tokens those dropped
    load_llm_only_tokens: int = 0  # tokens the LLM wrote alone because the server was under load


@dataclass
class Result:
    request_id: str
    text: str
    tokens: list[Token] = field(default_factory=list)
    stats: Stats | None = None

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]

    @property
    def sources(self) -> list[str]:
        return [t.source for t in self.tokens]


def build_request(prompt: Prompt, *, max_tokens: int = 0, temperature: float = 0.0, top_p: float = 0.0,
                  top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (),
                  stop_token_ids: Sequence[int] = (), threshold: float | None = None, logprobs: bool = False,
                  ignore_eos: bool = False, request_id: str = "", timeout_ms: int = 0,
                  llm_share: float | None = None, rollback_below: float | None = None,
                  max_draft_tokens: int | None = None,
                  min_draft_probability: float | None = None) -> coordinator_pb2.GenerateRequest:
    req = coordinator_pb2.GenerateRequest(request_id=request_id, max_tokens=max_tokens, stop=list(stop),
                                          stop_token_ids=list(stop_token_ids), logprobs=logprobs,
                                          ignore_eos=ignore_eos, timeout_ms=timeout_ms)
    req.sampling.temperature, req.sampling.top_p, req.sampling.top_k = temperature, top_p, top_k
    if seed is not None:
        req.sampling.seed = seed
    if threshold is not None:
        req.threshold = threshold
    if llm_share is not None:  # a share of tokens for the LLM instead of a threshold (trained routers)
        req.llm_share = llm_share
    if rollback_below is not None:  # verify mode (BiLD-style rollback); see coordinator.proto
        req.rollback_below = rollback_below
    if max_draft_tokens is not None:  # verify mode's draft length; see coordinator.proto
        req.max_draft_tokens = max_draft_tokens
    if min_draft_probability is not None:  # verify mode: drafts end where the SLM is less sure than this
        req.min_draft_probability = min_draft_probability
    if isinstance(prompt, str):
        req.prompt = prompt
    elif prompt and isinstance(prompt[0], dict):
        for m in prompt:
            req.chat.messages.add(role=m["role"], content=m["content"])
    elif prompt and all(isinstance(t, int) for t in prompt):
        req.prompt_token_ids.ids.extend(prompt)
    else:
        raise ValueError("prompt must be text, a non-empty list of chat messages or a non-empty list of token ids")
    return req


def token_from_proto(ev: coordinator_pb2.TokenEvent, with_logprob: bool) -> Token:
    return Token(index=ev.index, token_id=ev.token_id, text=ev.text, source=PROVENANCE.get(ev.provenance, "?"),
                 logprob=ev.logprob if with_logprob else None,
                 router_probability=ev.router_probability if ev.router_probability >= 0 else None)


def stats_from_proto(s: coordinator_pb2.GenerationStats) -> Stats:
    return Stats(finish_reason=FINISH.get(s.finish_reason, "unknown"), prompt_tokens=s.prompt_tokens,
                 completion_tokens=s.completion_tokens, llm_tokens=s.llm_tokens, llm_share=s.llm_share,
                 time_to_first_token_s=s.time_to_first_token_s, total_s=s.total_s, tokens_per_s=s.tokens_per_s,
                 stop_sequence=s.stop_sequence, text_tail=s.text_tail, verify_passes=s.verify_passes,
                 rollbacks=s.rollbacks, discarded_tokens=s.discarded_tokens,
                 load_llm_only_tokens=s.load_llm_only_tokens)
