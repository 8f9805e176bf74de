"""Per-session KV cache bookkeeping: bounded, LRU-evictable soft state.

The coordinator's token history is the truth; what is stored here only saves recomputation. A session
that is evicted simply reads as unknown (0 tokens held) and the coordinator re-sends its history.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# One layer's (keys, values), each [1, kv_heads, tokens, head_dim].
LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class SessionKV:
    layers: list[LayerKV] | None  # None until the first forward
    length: int = 0

    def crop(self, length: int) -> None:
        """Keep the first `length` tokens (repairs a resend after a lost response)."""
        if self.layers is not None and length < self.length:
            self.layers = [(k[:, :, :length].clone(), v[:, :, :length].clone()) for k, v in self.layers]
        self.length = min(self.length, length)


class CapacityError(Exception):
    """A session would not fit this worker's KV budget even alone."""


class KVStore:
    def __init__(self, max_sessions: int, max_tokens_per_session: int, max_total_tokens: int):
        self.max_sessions = max_sessions
        self.max_tokens_per_session = max_tokens_per_session
        self.max_total_tokens = max_total_tokens
        self._sessions: OrderedDict[str, SessionKV] = OrderedDict()  # least recently used first
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    @property
    def held_tokens(self) -> int:
        return sum(s.length for s in self._sessions.values())

    def held(self, session_id: str) -> int:
        s = self._sessions.get(session_id)
        return s.length if s is not None else 0

    def get(self, session_id: str) -> SessionKV | None:
        return self._sessions.get(session_id)

    def touch(self, session_id: str) -> SessionKV:
        """The session's entry (created empty if new), marked most recently used."""
        s = self._sessions.get(session_id)
        if s is None:
            s = self._sessions[session_id] = SessionKV(layers=None)
        self._sessions.move_to_end(session_id)
        return s

    def release(self, session_ids) -> int:
        return sum(self._sessions.pop(sid, None) is not None for sid in session_ids)

    def make_room(self, growth: dict[str, int]) -> list[str]:
        """Evict least-recently-used sessions outside `growth` until the sessions in `growth` can grow by
        the given token counts within the budgets. Returns the evicted ids; raises CapacityError when a
        session cannot fit even alone."""
        for sid, extra in growth.items():
            if self.held(sid) + extra > self.max_tokens_per_session:
                raise CapacityError(f"session {sid} would hold {self.held(sid) + extra} tokens; "
                                    f"this worker allows {self.max_tokens_per_session} per session")
        need_total = self.held_tokens + sum(growth.values())
        new_sessions = sum(1 for sid in growth if sid not in self._sessions)
        evicted = []
        for sid in list(self._sessions):
            if need_total <= self.max_total_tokens and len(self._sessions) + new_sessions <= self.max_sessions:
                break
            if sid in growth:
                continue
            need_total -= self._sessions.pop(sid).length
            evicted.append(sid)
        self.evictions += len(evicted)
        if need_total > self.max_total_tokens or len(self._sessions) + new_sessions > self.max_sessions:
            raise CapacityError(f"batch needs {need_total} KV tokens in {len(self._sessions) + new_sessions} "
                                f"sessions; budget is {self.max_total_tokens} tokens, {self.max_sessions} sessions")
        return evicted
