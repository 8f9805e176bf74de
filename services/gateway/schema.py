"""OpenAI request validation, field mapping onto the coordinator request, and response/chunk formatting.

Everything a request may hold is listed here: a field is supported (mapped onto the coordinator's
GenerateRequest), allowed and ignored (`user` and other pure hints), unsupported (accepted only with its
"off" value — null, 0, false, 1 for `n`, empty — otherwise HTTP 400 naming it) or unknown (HTTP 400).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from r2r_client import R2RError
from r2r_client.types import Stats, Token

# ---- errors --------------------------------------------------------------------------------------


class GatewayError(Exception):
    """An error the gateway answers with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


# gRPC status (the SDK's exception class name) -> HTTP status, OpenAI error type, code.
_GRPC_TO_HTTP = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", None),
    "UNAUTHENTICATED": (401, "invalid_request_error", "invalid_api_key"),  # as OpenAI answers a bad API key
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error", "rate_limit_exceeded"),
    "DEADLINE_EXCEEDED": (504, "timeout_error", "timeout"),
    "UNAVAILABLE": (503, "service_unavailable_error", "service_unavailable"),
    "CANCELLED": (499, "cancelled_error", "cancelled"),
}


def from_r2r_error(exc: R2RError) -> GatewayError:
    """Map a coordinator error (a typed SDK exception) onto HTTP, keeping the coordinator's message."""
    status, type_, code = _GRPC_TO_HTTP.get(exc.code.name, (500, "server_error", "internal_error"))
    headers = ({"retry-after": "1"} if status in (429, 503) else
               {"www-authenticate": "Bearer"} if status == 401 else None)
    return GatewayError(status, exc.details, param=None, code=code, type=type_, headers=headers)


# ---- the parsed request --------------------------------------------------------------------------

# Extra (non-OpenAI) request fields, like vLLM's: the R2R knob and two sampling/limit controls.
EXTRA_FIELDS = ("r2r_threshold", "r2r_rollback_below", "r2r_max_draft_tokens", "r2r_min_draft_probability", "top_k",
                "ignore_eos")

# Unsupported fields, accepted only with one of these "off" values.
_OFF: dict[str, Callable[[Any], bool]] = {
    "best_of": lambda v: v == 1,
    "echo": lambda v: v is False,
    "suffix": lambda v: v == "",
    "logit_bias": lambda v: v == {},
    "presence_penalty": lambda v: v == 0,
    "frequency_penalty": lambda v: v == 0,
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "parallel_tool_calls": lambda v: isinstance(v, bool),  # meaningless without tools
    "functions": lambda v: v == [],
    "function_call": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "audio": lambda v: False,
    "modalities": lambda v: v == ["text"],
    "prediction": lambda v: False,
    "reasoning_effort": lambda v: False,
    "verbosity": lambda v: False,
    "web_search_options": lambda v: False,
    "service_tier": lambda v: v in ("auto", "default"),
    "store": lambda v: v is False,
    "metadata": lambda v: v == {},
}
_IGNORED = {"user", "safety_identifier", "prompt_cache_key"}

COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs", "n",
                     "stream", "stream_options", *EXTRA_FIELDS}
COMPLETION_UNSUPPORTED = {"best_of", "echo", "suffix", "logit_bias", "presence_penalty", "frequency_penalty"}
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
               "logprobs", "top_logprobs", "n", "stream", "stream_options", *EXTRA_FIELDS}
CHAT_UNSUPPORTED = set(_OFF) - {"best_of", "echo", "suffix"}

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_SEED = 2**64


@dataclass
class Plan:
    """A validated request: what to send to the coordinator and how to answer."""

    kind: str                         # "completion" or "chat"
    model: str                        # echoed back in responses
    prompt: Any                       # SDK prompt: text, chat messages or token ids
    params: dict = field(default_factory=dict)  # SDK keyword arguments (max_tokens, temperature, ...)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False            # the chosen token's logprob, per token


@dataclass
class ModelTable:
    """The model ids the gateway answers to. `name` is R2R itself; the SLM/LLM ids (from the coordinator's
    GetServerInfo) select one model alone (router threshold > 1 = the SLM, 0 = the LLM)."""

    name: str
    slm: str | None = None
    llm: str | None = None

    def threshold_for(self, model: str) -> float | None:
        """None for the R2R model (the router's default threshold); a fixed threshold for SLM/LLM alone."""
        if model == self.name:
            return None
        if model == self.slm:
            return 2.0
        if model == self.llm:
            return 0.0
        raise GatewayError(404, f"The model '{model}' does not exist; this server has "
                                f"{', '.join(repr(m) for m in self.ids())}", param="model", code="model_not_found")

    def ids(self) -> list[str]:
        return list(dict.fromkeys(m for m in (self.name, self.slm, self.llm) if m))


# ---- field readers -------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _int(body: dict, key: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if not _is_int(v):
        raise invalid(f"'{key}' must be an integer, got {type(v).__name__}", key, "invalid_type")
    v = int(v)
    if lo is not None and v < lo:
        raise invalid(f"'{key}' must be >= {lo}, got {v}", key, "invalid_value")
    if hi is not None and v > hi:
        raise invalid(f"'{key}' must be <= {hi}, got {v}", key, "invalid_value")
    return v


def _num(body: dict, key: str, lo: float | None = None, hi: float | None = None) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise invalid(f"'{key}' must be a number", key, "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else (
            f">= {lo}" if lo is not None else f"<= {hi}")
        raise invalid(f"'{key}' must be {bounds}, got {v}", key, "invalid_value")
    return float(v)


def _bool(body: dict, key: str) -> bool | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise invalid(f"'{key}' must be a boolean", key, "invalid_type")
    return v


def _check_fields(body: dict, allowed: set[str], unsupported: set[str]) -> None:
    for key, value in body.items():
        if key in allowed or key in _IGNORED:
            continue
        if key in unsupported:
            if value is None or _OFF[key](value):
                continue
            raise invalid(f"'{key}' is not supported by this server (R2R gateway)", key, "unsupported_parameter")
        raise invalid(f"Unrecognized request argument supplied: {key}", key, "unknown_parameter")


def _common(body: dict, plan: Plan, models: ModelTable, default_temperature: float) -> None:
    """Fields shared by both endpoints."""
    n = _int(body, "n")
    if n is not None and n != 1:
        raise invalid(f"'n' must be 1 on this server (one choice per request), got {n}", "n", "unsupported_value")
    stream = _bool(body, "stream")
    plan.stream = bool(stream)
    opts = body.get("stream_options")
    if opts is not None:
        if not plan.stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(opts, dict):
            raise invalid("'stream_options' must be an object", "stream_options", "invalid_type")
        for key in opts:
            if key not in ("include_usage", "include_obfuscation"):
                raise invalid(f"Unrecognized argument in stream_options: {key}", f"stream_options.{key}",
                              "unknown_parameter")
        plan.include_usage = bool(_bool(opts, "include_usage"))
        _bool(opts, "include_obfuscation")  # type-checked, otherwise ignored (nothing to obfuscate)

    p = plan.params
    temperature = _num(body, "temperature", 0.0, 2.0)
    p["temperature"] = default_temperature if temperature is None else temperature
    top_p = _num(body, "top_p", 0.0, 1.0)
    if top_p is not None:
        if top_p == 0.0:  # only the most likely token: greedy (the coordinator's top_p=0 means "off")
            p["temperature"] = 0.0
        elif top_p < 1.0:  # 1 = the whole distribution = off
            p["top_p"] = top_p
    top_k = _int(body, "top_k", 0)
    if top_k:
        p["top_k"] = top_k
    seed = _int(body, "seed", -(2**63), MAX_SEED - 1)
    if seed is not None:
        p["seed"] = seed % MAX_SEED
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise invalid("'stop' must be a string or a list of strings", "stop", "invalid_type")
        if any(s == "" for s in stops):
            raise invalid("'stop' sequences must not be empty strings", "stop", "invalid_value")
        if stops:
            p["stop"] = stops
    if _bool(body, "ignore_eos"):
        p["ignore_eos"] = True

    model = body.get("model")
    if model is None:
        model = models.name
    if not isinstance(model, str):
        raise invalid("'model' must be a string", "model", "invalid_type")
    plan.model = model
    fixed = models.threshold_for(model)
    threshold = _num(body, "r2r_threshold", 0.0)
    if fixed is not None and threshold is not None:
        raise invalid(f"'r2r_threshold' only applies to model '{models.name}'; model '{model}' always runs "
                      f"one model alone", "r2r_threshold", "invalid_value")
    threshold = fixed if fixed is not None else threshold
    if threshold is not None:
        p["threshold"] = threshold
    rollback_below = _num(body, "r2r_rollback_below", 0.0, 1.0)  # verify mode (see coordinator.proto)
    if rollback_below is not None:
        p["rollback_below"] = rollback_below
    max_draft = _int(body, "r2r_max_draft_tokens", 0, 1 << 20)  # verify mode's draft length (see coordinator.proto)
    if max_draft is not None:
        p["max_draft_tokens"] = max_draft
    min_draft_prob = _num(body, "r2r_min_draft_probability", 0.0, 1.0)  # verify mode's draft stop (coordinator.proto)
    if min_draft_prob is not None:
        p["min_draft_probability"] = min_draft_prob


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    return body


def parse_completion(body, models: ModelTable, default_temperature: float = 1.0) -> Plan:
    """POST /v1/completions. `prompt`: a string, a list of token ids, or a list holding exactly one of
    those; several prompts in one request are refused (send one request each)."""
    body = _object(body)
    _check_fields(body, COMPLETION_FIELDS, COMPLETION_UNSUPPORTED)
    plan = Plan(kind="completion", model="", prompt=None)
    if "prompt" not in body or body["prompt"] is None:
        raise invalid("'prompt' is required", "prompt", "missing_required_parameter")
    plan.prompt = _prompt(body["prompt"])
    _common(body, plan, models, default_temperature)
    max_tokens = _int(body, "max_tokens", 1)
    if max_tokens is not None:
        plan.params["max_tokens"] = max_tokens
    logprobs = _int(body, "logprobs", 0)
    if logprobs is not None:
        if logprobs > 0:
            raise invalid(f"'logprobs' must be 0 on this server: it returns the chosen token's logprob only, no "
                          f"top-{logprobs} alternatives", "logprobs", "unsupported_value")
        plan.logprobs = True
        plan.params["logprobs"] = True
    return plan


def _token_ids(v) -> list[int] | None:
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return list(v)
    return None


def _prompt(v):
    if isinstance(v, str):
        return v
    if not isinstance(v, list) or not v:
        raise invalid("'prompt' must be a string, a list of token ids, or a list holding one of those", "prompt",
                      "invalid_type")
    ids = _token_ids(v)
    if ids is not None:
        return ids
    if len(v) > 1:
        raise invalid(f"'prompt' holds {len(v)} prompts; this server takes one prompt per request", "prompt",
                      "unsupported_value")
    one = v[0]
    if isinstance(one, str):
        return one
    ids = _token_ids(one)
    if ids is None:
        raise invalid("'prompt' must be a string, a list of token ids, or a list holding one of those", "prompt",
                      "invalid_type")
    return ids


def parse_chat(body, models: ModelTable, default_temperature: float = 1.0) -> Plan:
    """POST /v1/chat/completions. The coordinator applies the model's chat template."""
    body = _object(body)
    _check_fields(body, CHAT_FIELDS, CHAT_UNSUPPORTED)
    plan = Plan(kind="chat", model="", prompt=None)
    plan.prompt = _messages(body.get("messages"))
    _common(body, plan, models, default_temperature)
    max_tokens = _int(body, "max_tokens", 1)
    max_completion = _int(body, "max_completion_tokens", 1)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise invalid("'max_tokens' and 'max_completion_tokens' differ; set only 'max_completion_tokens'",
                      "max_tokens", "invalid_value")
    limit = max_completion if max_completion is not None else max_tokens
    if limit is not None:
        plan.params["max_tokens"] = limit
    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, 20)
    if top:
        raise invalid(f"'top_logprobs' must be 0 on this server: it returns the chosen token's logprob only, no "
                      f"top-{top} alternatives", "top_logprobs", "unsupported_value")
    if top is not None and not logprobs:
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if logprobs:
        plan.logprobs = True
        plan.params["logprobs"] = True
    return plan


def _messages(msgs) -> list[dict]:
    if msgs is None:
        raise invalid("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise invalid("'messages' must be a non-empty list", "messages", "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"'{where}' must be an object", where, "invalid_type")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"'{where}.role' is {role!r}; use one of {sorted(CHAT_ROLES)}", f"{where}.role",
                          "invalid_value")
        for key, value in m.items():
            if key not in ("role", "content") and value is not None:
                raise invalid(f"'{where}.{key}' is not supported by this server (R2R gateway)", f"{where}.{key}",
                              "unsupported_parameter")
        out.append({"role": CHAT_ROLES[role], "content": _content(m.get("content"), role, where)})
    return out


def _content(content, role: str, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        if role == "assistant":
            return ""
        raise invalid(f"'{where}.content' is required", f"{where}.content", "missing_required_parameter")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"'{where}.content[{j}]' is of type {kind!r}; this server takes text parts only",
                              f"{where}.content[{j}].type", "unsupported_value")
            parts.append(part["text"])
        return "\n".join(parts)
    raise invalid(f"'{where}.content' must be a string or a list of text parts", f"{where}.content",
                  "invalid_type")


# ---- responses -----------------------------------------------------------------------------------

FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length"}


def finish_reason(stats: Stats) -> str:
    return FINISH_REASON.get(stats.finish_reason, "stop")


def usage(stats: Stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}


def r2r_summary(stats: Stats) -> dict:
    return {"llm_tokens": stats.llm_tokens, "llm_share": stats.llm_share,
            "time_to_first_token_s": stats.time_to_first_token_s, "total_s": stats.total_s,
            "tokens_per_s": stats.tokens_per_s, "coordinator_finish_reason": stats.finish_reason,
            "stop_sequence": stats.stop_sequence or None,
            **({"verify_passes": stats.verify_passes, "rollbacks": stats.rollbacks,
                "discarded_tokens": stats.discarded_tokens} if stats.verify_passes else {}),
            **({"load_llm_only_tokens": stats.load_llm_only_tokens} if stats.load_llm_only_tokens else {})}


def r2r_token(tok: Token) -> dict:
    return {"index": tok.index, "token_id": tok.token_id, "source": tok.source,
            "router_probability": tok.router_probability}


class Formatter:
    """Builds one request's response objects; `kind` picks the completion or chat shapes."""

    def __init__(self, plan: Plan, response_id: str, created: int):
        self.plan, self.id, self.created = plan, response_id, created
        self.chat = plan.kind == "chat"
        self.object = "chat.completion.chunk" if self.chat else "text_completion"
        self.offset = 0  # completion logprobs: text_offset of the next token

    def _chunk(self, choices: list[dict], **extra) -> dict:
        chunk = {"id": self.id, "object": self.object, "created": self.created, "model": self.plan.model,
                 "system_fingerprint": None, "choices": choices}
        if self.plan.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return chunk

    def _choice(self, text: str | None, logprobs=None, finish: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def _token_logprobs(self, tokens: list[Token]):
        if not self.plan.logprobs:
            return None
        if self.chat:
            return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                                 "top_logprobs": []} for t in tokens], "refusal": None}
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t.text)
        return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": None, "text_offset": offsets}

    # streaming
    def role_chunk(self) -> dict | None:
        return self._chunk([self._choice("", role=True)]) if self.chat else None

    def token_chunk(self, tok: Token) -> dict:
        return self._chunk([self._choice(tok.text, self._token_logprobs([tok]))], r2r=r2r_token(tok))

    def tail_chunk(self, text: str) -> dict | None:
        """Text the coordinator held back (a possible stop-string prefix) and released at the end."""
        if not text:
            return None
        self.offset += len(text)
        return self._chunk([self._choice(text)])

    def finish_chunk(self, stats: Stats) -> dict:
        return self._chunk([self._choice(None if self.chat else "", finish=finish_reason(stats))],
                           r2r=r2r_summary(stats))

    def usage_chunk(self, stats: Stats) -> dict:
        return self._chunk([], usage=usage(stats))

    # non-streaming
    def response(self, text: str, tokens: list[Token], stats: Stats) -> dict:
        logprobs = self._token_logprobs(tokens)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": logprobs, "finish_reason": finish_reason(stats)}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(stats)}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.plan.model, "system_fingerprint": None,
                "choices": [choice], "usage": usage(stats),
                "r2r": {**r2r_summary(stats), "token_ids": [t.token_id for t in tokens],
                        "sources": [t.source for t in tokens]}}
