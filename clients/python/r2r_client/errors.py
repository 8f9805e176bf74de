"""Typed exceptions for the coordinator's gRPC status codes."""

from __future__ import annotations

import grpc


class R2RError(Exception):
    """Base class; `code` is the gRPC status code, `details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    retryable = False

    def __init__(self, details: str, code: grpc.StatusCode | None = None):
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code


class InvalidRequest(R2RError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(R2RError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True


class DeadlineExceeded(R2RError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(R2RError):
    code = grpc.StatusCode.CANCELLED


class Unavailable(R2RError):
    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class NotFound(R2RError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(R2RError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ServerError(R2RError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {cls.code: cls for cls in (InvalidRequest, Overloaded, DeadlineExceeded, Cancelled, Unavailable,
                                      NotFound, Unauthenticated, ServerError)}


def from_rpc_error(exc: grpc.RpcError) -> R2RError:
    code = exc.code()
    cls = _BY_CODE.get(code, R2RError)
    return cls(exc.details() or str(code), code)
