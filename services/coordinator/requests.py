"""Validation of public requests and their translation to token ids. Every problem is a ValueError with a
sentence a person can act on; the servicer maps it to INVALID_ARGUMENT."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from r2r_serve.proto import coordinator_pb2
from r2r_serve.worker.sampling import Sampling, validate as validate_sampling

MAX_STOPS = 16
CHAT_ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int
    default_max_tokens: int
    context: int
    vocab_size: int


@dataclass(frozen=True)
class ChatOptions:
    """How chat requests are rendered: a default system message and extra chat-template arguments
    (a pair's config file sets them; see models/pair_config.py)."""

    system_prompt: str = ""
    template_kwargs: dict = field(default_factory=dict)

    def messages(self, msgs) -> list[dict]:
        out = [{"role": m.role, "content": m.content} for m in msgs]
        if self.system_prompt and out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": self.system_prompt})
        return out


def prompt_ids(req: coordinator_pb2.GenerateRequest, tokenizer, limits: Limits,
               chat: ChatOptions = ChatOptions()) -> list[int]:
    kind = req.WhichOneof("input")
    if kind is None:
        raise ValueError("the request has no input: set prompt, chat or prompt_token_ids")
    if kind == "prompt":
        if not req.prompt.strip():
            raise ValueError("prompt is empty")
        ids = tokenizer(req.prompt, add_special_tokens=True)["input_ids"]
    elif kind == "chat":
        msgs = req.chat.messages
        if not msgs:
            raise ValueError("chat has no messages")
        for i, m in enumerate(msgs):
            if m.role not in CHAT_ROLES:
                raise ValueError(f"chat message {i} has role {m.role!r}; use one of {sorted(CHAT_ROLES)}")
        if not tokenizer.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        rendered = tokenizer.apply_chat_template(chat.messages(msgs), add_generation_prompt=True, tokenize=False,
                                                 **chat.template_kwargs)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        ids = list(req.prompt_token_ids.ids)
        if not ids:
            raise ValueError("prompt_token_ids is empty")
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size})")
    if not ids:
        raise ValueError("the prompt tokenizes to nothing")
    if len(ids) > limits.max_prompt_tokens:
        raise ValueError(f"the prompt has {len(ids)} tokens; this server accepts at most {limits.max_prompt_tokens}")
    if len(ids) >= limits.context:
        raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {limits.context} tokens")
    return ids


def max_new_tokens(req: coordinator_pb2.GenerateRequest, prompt_len: int, limits: Limits) -> int:
    room = limits.context - prompt_len
    if req.max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0 (0 = server default), got {req.max_tokens}")
    if req.max_tokens == 0:
        return min(limits.default_max_tokens, room)
    if req.max_tokens > limits.max_new_tokens:
        raise ValueError(f"max_tokens is {req.max_tokens}; this server allows at most {limits.max_new_tokens}")
    if req.max_tokens > room:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({req.max_tokens}) exceeds the model's "
                         f"context of {limits.context} tokens")
    return req.max_tokens


def check_rest(req: coordinator_pb2.GenerateRequest, limits: Limits) -> None:
    problem = validate_sampling(Sampling.from_proto(req.sampling))
    if problem:
        raise ValueError(problem)
    if req.HasField("threshold") and (math.isnan(req.threshold) or req.threshold < 0):
        raise ValueError(f"threshold must be >= 0 (0 = always the LLM, > 1 = never), got {req.threshold}")
    if req.HasField("threshold") and req.HasField("llm_share"):
        raise ValueError("set either threshold or llm_share, not both")
    if req.HasField("rollback_below") and not 0.0 <= req.rollback_below <= 1.0:  # also refuses NaN
        raise ValueError(f"rollback_below must be in [0, 1] (0 = no verify mode, 1 = roll back every token the "
                         f"LLM would not have written), got {req.rollback_below}")
    for name in ("max_draft_tokens", "min_draft_probability"):
        if req.HasField(name) and not req.rollback_below > 0.0:
            raise ValueError(f"{name} applies to verify mode only: set rollback_below too")
    if req.HasField("min_draft_probability") and not 0.0 <= req.min_draft_probability <= 1.0:  # also NaN
        raise ValueError(f"min_draft_probability must be in [0, 1] (0 = off), got {req.min_draft_probability}")
    if len(req.stop) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(req.stop)}")
    if any(not s for s in req.stop):
        raise ValueError("stop sequences must not be empty strings")
    bad = [t for t in req.stop_token_ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise ValueError(f"stop token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size})")
