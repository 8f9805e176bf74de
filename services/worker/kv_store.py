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


@dataclass(eq=False)
class SessionKV:
    layers: list[LayerKV] | None  # None until the first forward; stale while the session sits in a group
    length: int = 0
    group: "DecodeGroup | None" = None  # where the KV lives while the session decodes in a steady batch
    row: int = 0

    def own(self) -> None:
        """Bring the KV back into `layers` (out of its decode group, if it sits in one)."""
        if self.group is not None:
            self.group.detach(self)

    def forget(self) -> None:
        """The session is gone (released or evicted): free its group row without copying anything."""
        if self.group is not None:
            self.group.drop(self)

    def crop(self, length: int) -> None:
        """Keep the first `length` tokens (repairs a resend after a lost response)."""
        self.own()
        if self.layers is not None and length < self.length:
            self.layers = [(k[:, :, :length].clone(), v[:, :, :length].clone()) for k, v in self.layers]
        self.length = min(self.length, length)


class DecodeGroup:
    """The KV of sessions that decode together, batch-major and left-padded in preallocated buffers.

    Row r holds its session's `length` tokens at columns [width - length, width), zeros before them, so
    every row ends at column `width`, exactly the layout the engine's ragged forward builds for the same
    batch (same padding, same mask, same positions). While the same sessions keep decoding together, a
    step appends one column in place and attention reads views of the buffers: no KV is copied. Capacity
    grows geometrically when full. A session leaves by `detach` (its KV copied back into its own
    `layers`) or `drop` (released/evicted: nothing copied); its row then stays dead until the group is
    replaced, and a group with dead rows is never stepped again.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], sessions: list[SessionKV], width: int):
        self.keys, self.values = keys, values  # per layer [rows, kv_heads, capacity, head_dim]
        self.sessions: list[SessionKV | None] = list(sessions)
        self.width = width
        self.live = len(sessions)
        device = keys[0].device
        for r, s in enumerate(sessions):
            s.group, s.row, s.layers = self, r, None
        self.pad = torch.tensor([width - s.length for s in sessions], dtype=torch.long, device=device)
        self._build_mask()

    @property
    def rows(self) -> int:
        return len(self.sessions)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def _build_mask(self) -> None:
        # Columns from a row's first token on are real, including every column still to be appended.
        cols = torch.arange(self.capacity, device=self.pad.device)
        self.mask = cols[None, :] >= self.pad[:, None]

    def serves(self, sessions: list[SessionKV]) -> bool:
        """True when `sessions` (in any order, no duplicates) are exactly this group's rows, all live."""
        return self.live == self.rows == len(sessions) and all(s.group is self for s in sessions)

    def reserve(self, extra: int, headroom: int) -> None:
        """Make room for `extra` more columns (reallocating with `headroom` spare columns when full)."""
        need = self.width + extra
        if need <= self.capacity:
            return
        cap = need + headroom
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_empty((old.shape[0], old.shape[1], cap, old.shape[3]))  # columns >= width: written
                new[:, :, : self.width] = old[:, :, : self.width]                      # before they are read
                buffers[i] = new
        self._build_mask()

    def session_view(self, s: SessionKV) -> list[LayerKV]:
        """Views of the session's KV inside the buffers, [1, kv_heads, length, head_dim] per layer."""
        lo, hi, r = self.width - s.length, self.width, s.row
        return [(k[r: r + 1, :, lo:hi], v[r: r + 1, :, lo:hi]) for k, v in zip(self.keys, self.values)]

    def detach(self, s: SessionKV) -> None:
        s.layers = [(k.clone(), v.clone()) for k, v in self.session_view(s)] if s.length else None
        self.drop(s)

    def drop(self, s: SessionKV) -> None:
        self.sessions[s.row] = None
        self.live -= 1
        s.group = None

    def dissolve(self) -> None:
        """Hand every live session its own copy of its KV; the buffers can then be freed."""
        for s in self.sessions:
            if s is not None:
                self.detach(s)


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

    def _pop(self, session_id: str) -> SessionKV | None:
        s = self._sessions.pop(session_id, None)
        if s is not None:
            s.forget()
        return s

    def release(self, session_ids) -> int:
        return sum(self._pop(sid) is not None for sid in session_ids)

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
            need_total -= self._pop(sid).length
            evicted.append(sid)
        self.evictions += len(evicted)
        if need_total > self.max_total_tokens or len(self._sessions) + new_sessions > self.max_sessions:
            raise CapacityError(f"batch needs {need_total} KV tokens in {len(self._sessions) + new_sessions} "
                                f"sessions; budget is {self.max_total_tokens} tokens, {self.max_sessions} sessions")
        return evicted
