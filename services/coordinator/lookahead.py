"""Lookahead: send a session's next extend before its current token is final.

A step's next call is known as soon as its token is: the SLM extends with that token (the LLM, for an
LLM-only session). Without lookahead the worker sits idle while the coordinator consults the router,
streams the token to the client and loops back. With it the coordinator sends that extend at once:
  - a token that is already final (an LLM answer, or any token of an SLM-only / LLM-only session): the
    extend is certain to be wanted;
  - an SLM proposal the router has not judged yet: the extend assumes the router keeps it. When the router
    routes and the LLM writes a different token, the extend is discarded and the session's cursor set back
    to the position it assumed: the worker crops its KV to that point on the next extend (KV past the
    cursor is never trusted), so outputs are exactly those of the step-by-step loop.
The cost is a wasted SLM step per routed token the LLM changes; on a GPU it runs beside the LLM's forward,
on a CPU it competes with it for cores (bench/ measures both settings). `--lookahead-min-probability P` skips
the early extend for proposals the SLM gives less than P, the tokens a router is likely to route.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from r2r_serve.common import metrics
from r2r_serve.coordinator.pool import Placement, WorkerPool
from r2r_serve.proto import common_pb2, worker_pb2


@dataclass
class Lookahead:
    pool: WorkerPool
    placement: Placement
    position: int   # where the assumed token sits in the history
    token: int
    task: asyncio.Task

    @classmethod
    def start(cls, pool: WorkerPool, placement: Placement, session_id: str, history: list[int], token: int,
              sampling: common_pb2.SamplingParams, want_features: bool) -> "Lookahead":
        task = asyncio.get_running_loop().create_task(
            pool.extend(session_id, placement, [*history, token], sampling, want_features),
            name=f"lookahead-{pool.role}-{session_id}")
        task.add_done_callback(_retrieve)
        return cls(pool, placement, len(history), token, task)

    def matches(self, history: list[int]) -> bool:
        """Is this the extend the session needs now: is the history what it assumed?"""
        return len(history) == self.position + 1 and history[self.position] == self.token

    async def result(self) -> worker_pb2.ExtendResult:
        metrics.LOOKAHEAD_STEPS.labels(self.pool.role, "used").inc()
        return await self.task

    def discard(self) -> None:
        """Drop the extend. A task not yet done never moves the cursor (a cancelled `pool.extend` stops at
        an await, before it records the answer); one that is done did, so move it back."""
        self.task.cancel()
        self.placement.cursor = min(self.placement.cursor, self.position)
        metrics.LOOKAHEAD_STEPS.labels(self.pool.role, "discarded").inc()


def _retrieve(task: asyncio.Task) -> None:
    """A discarded extend's failure is nobody's error: fetch it so asyncio does not log it as lost."""
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.exception()
