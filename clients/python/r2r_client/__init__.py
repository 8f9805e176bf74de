"""Python SDK for the R2R coordinator: `AsyncR2RClient` (asyncio) and `R2RClient` (blocking)."""

from r2r_client.aio import AsyncR2RClient, AsyncStream
from r2r_client.errors import (Cancelled, DeadlineExceeded, InvalidRequest, NotFound, Overloaded, R2RError,
                               ServerError, Unauthenticated, Unavailable)
from r2r_client.retry import NO_RETRY, RetryPolicy
from r2r_client.sync import R2RClient, Stream
from r2r_client.types import Result, Stats, Token

__all__ = ["AsyncR2RClient", "AsyncStream", "R2RClient", "Stream", "RetryPolicy", "NO_RETRY", "Result", "Stats", "Token", "R2RError",
           "InvalidRequest", "Overloaded", "DeadlineExceeded", "Cancelled", "Unavailable", "NotFound",
           "Unauthenticated", "ServerError"]
